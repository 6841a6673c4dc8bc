"""How far the fused head's bf16 gradients land from the truth, by accumulator dtype and vocabulary size.

The Triton engine adds each (positions × vocabulary) tile's fp32 contribution into the gradient buffers
atomically, in whatever order the tiles finish: a hidden row gets one addition per vocabulary tile
(hundreds at 128k ids), a weight row one per block of positions. With a bf16 accumulator each addition
is rounded to bf16. This models exactly that arithmetic on the CPU (no GPU needed: the rounding, not the
hardware, decides it): bf16 inputs, fp32 tile products, additions in a random tile order rounded to the
accumulator's dtype, against the fp64 truth on the same bf16 inputs; beside it the dense bf16 head
(fp32 accumulation inside one matrix product, rounded once), which is what the low-precision criterion
compares with. Relative error in Frobenius norm, median over ``--trials`` draws.

    python benchmarks/accumulation_error.py [--vocab 32768,128256,256000] [--positions 256] [--hidden 128]
"""
from __future__ import annotations

import argparse
import statistics

import torch

TILE_C, TILE_M = 256, 128  # the Hopper tile's columns (vocabulary) and rows (positions)


def logits_gradient(h: torch.Tensor, w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """softmax - one-hot of a random label per position, fp32 (the loss's gradient on the logits)."""
    z = (h.double() @ w.double().T)
    g = torch.softmax(z, dim=-1)
    labels = torch.randint(0, w.shape[0], (h.shape[0],), generator=generator)
    g[torch.arange(h.shape[0]), labels] -= 1
    return g.float()


def accumulated(parts: list[torch.Tensor], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Σ parts added one at a time in a random order, each sum rounded to ``dtype``."""
    acc = torch.zeros_like(parts[0], dtype=dtype)
    for i in torch.randperm(len(parts), generator=generator).tolist():
        acc = (acc.float() + parts[i]).to(dtype)
    return acc


def errors(V: int, N: int, H: int, seed: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).bfloat16()
    w = (torch.randn(V, H, generator=g) * 3 * H ** -0.5).bfloat16()  # logits of a few units, as in training
    grad = logits_gradient(h, w, g)
    hf, wf, gb = h.float(), w.float(), grad.bfloat16().float()       # the kernels' operands in bf16
    truth_h, truth_w = grad.double() @ wf.double(), grad.double().T @ hf.double()

    def rel(x: torch.Tensor, truth: torch.Tensor) -> float:
        return float((x.double() - truth).norm() / truth.norm())

    h_parts = [gb[:, c:c + TILE_C] @ wf[c:c + TILE_C] for c in range(0, V, TILE_C)]
    w_parts = [gb[m:m + TILE_M].T @ hf[m:m + TILE_M] for m in range(0, N, TILE_M)]
    return {"hidden, dense bf16 head": rel((gb @ wf).bfloat16(), truth_h),
            "hidden, bf16 accumulator": rel(accumulated(h_parts, torch.bfloat16, g), truth_h),
            "hidden, fp32 accumulator": rel(accumulated(h_parts, torch.float32, g).bfloat16(), truth_h),
            "weight, dense bf16 head": rel((gb.T @ hf).bfloat16(), truth_w),
            "weight, bf16 accumulator": rel(accumulated(w_parts, torch.bfloat16, g), truth_w),
            "weight, fp32 accumulator": rel(accumulated(w_parts, torch.float32, g).bfloat16(), truth_w)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", default="32768,128256,256000", help="vocabulary sizes, comma-separated")
    parser.add_argument("--positions", type=int, default=256, help="positions N (the weight rows' additions: N/128)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    vocab = [int(v) for v in args.vocab.split(",")]
    found = {V: [errors(V, args.positions, args.hidden, seed) for seed in range(args.trials)] for V in vocab}
    names = list(found[vocab[0]][0])
    print(f"## Relative error of bf16 gradients (norm), N={args.positions}, H={args.hidden}, tiles "
          f"{TILE_M}×{TILE_C}, median of {args.trials}")
    print("| gradient, accumulation | " + " | ".join(f"V={V} ({-(-V // TILE_C)} tiles)" for V in vocab) + " |")
    print("|---|" + "---|" * len(vocab))
    for name in names:
        cells = [f"{statistics.median(t[name] for t in found[V]):.4f}" for V in vocab]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
