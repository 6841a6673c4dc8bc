"""GPU fused-head benchmark: the Triton kernels against Liger-Kernel, Cut Cross-Entropy, torch's
chunked ``F.linear_cross_entropy`` and HF-style full logits, at Llama-3-8B's and Gemma-2-2B's heads.

Forward+backward with gradients for hidden and weight, bf16, Zipf-distributed labels. Time: median of
``--repeats`` rounds after warm-up, providers interleaved in each round, with CUDA events. Memory: the allocator's peak above the inputs,
against the lower bound of the two gradients (weight and hidden, in the inputs' dtype). Peers that
are not installed are listed as skipped. ``--shape tiny --device cpu`` runs the same code through
Triton's interpreter (set TRITON_INTERPRET=1 before starting) so that the script itself is tested.

    python benchmarks/bench_gpu.py [--shape llama3-8b,gemma2-2b] [--repeats 5] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import seqloss
from common import distinct_per_row, publish, zipf_labels

SHAPES = {"llama3-8b": (8192, 4096, 128256), "gemma2-2b": (8192, 2304, 256000), "tiny": (48, 32, 200)}


def hf_naive(h, W, y):
    return F.cross_entropy((h @ W.t()).float(), y, ignore_index=-100)


def torch_chunked() -> Optional[Callable]:
    if not hasattr(F, "linear_cross_entropy"):  # added in torch 2.13
        return None
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, W, y: F.linear_cross_entropy(h, W, y, ignore_index=-100, options=options)


def liger() -> Optional[Callable]:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return lambda h, W, y: liger_fused_linear_cross_entropy(h, W, y)


def cut_cross_entropy() -> Optional[Callable]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda h, W, y: linear_cross_entropy(h, W, y)


def seqloss_fused(objective: str, impl: str) -> Callable:
    return lambda h, W, y: seqloss.linear_loss(h, W, y, objective=objective, impl=impl)


def providers() -> dict[str, Optional[Callable]]:
    return {"mle/hf naive": hf_naive, "mle/torch chunked": torch_chunked(), "mle/liger": liger(),
            "mle/cut cross-entropy": cut_cross_entropy(), "mle/seqloss triton": seqloss_fused("mle", "triton"),
            "mle/seqloss torch": seqloss_fused("mle", "torch"),
            "smile/seqloss triton": seqloss_fused("smile", "triton"),
            "smile/seqloss torch": seqloss_fused("smile", "torch")}


class Clock:
    """Milliseconds of a step: CUDA events on a GPU, the wall clock elsewhere; peak allocator bytes."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, step: Callable[[], None]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            step()
            return (time.perf_counter() - start) * 1e3
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end)

    def peak_extra(self, step: Callable[[], None]) -> Optional[float]:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base


def _step(fn: Callable, hidden, weight, labels) -> Callable[[], None]:
    def step() -> None:
        h, W = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        fn(h, W, labels).backward()
    return step


def run_shape(name: str, device: torch.device, dtype: torch.dtype, repeats: int):
    N, H, V = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, H, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype)
    labels = zipf_labels((1, N), V, pad_fraction=0.0).reshape(N).to(device)
    clock = Clock(device)
    bound = (V * H + N * H) * hidden.element_size()
    steps: dict[str, Callable[[], None]] = {}
    for provider, fn in providers().items():
        if fn is not None:
            steps[provider] = _step(fn, hidden, weight, labels)
            clock.time(steps[provider])  # warm-up: compilation and autotuning
    # Interleaved (A B A B ...), as a training loop interleaves work: repeating one provider alone
    # keeps its buffers and caches warm and can flatter it.
    times: dict[str, list] = {provider: [] for provider in steps}
    for _ in range(repeats):
        for provider, step in steps.items():
            times[provider].append(clock.time(step))
    rows = []
    for provider in providers():
        if provider not in steps:
            rows.append(dict(name=provider, skipped="not installed"))
        else:
            rows.append(dict(name=provider, ms=statistics.median(times[provider]),
                             peak=clock.peak_extra(steps[provider])))
    return rows, bound, distinct_per_row(labels.reshape(1, N).cpu())


COLUMNS = ("shape", "objective", "provider", "fwd+bwd ms", "vs fastest MLE peer", "peak extra GiB", "memory vs bound")


def table_rows(shape: str, rows, bound):
    timed = [r for r in rows if "ms" in r and r["name"].startswith("mle/") and "seqloss" not in r["name"]]
    fastest = min((r["ms"] for r in timed), default=None)
    out = []
    for r in rows:
        objective, provider = r["name"].split("/")
        row = {**dict.fromkeys(COLUMNS, ""), "shape": shape, "objective": objective, "provider": provider}
        if "skipped" in r:
            out.append({**row, "fwd+bwd ms": "skipped: " + r["skipped"]})
            continue
        peak = r["peak"]
        out.append({**row, "fwd+bwd ms": f"{r['ms']:.2f}",
                    "vs fastest MLE peer": f"{fastest / r['ms']:.2f}x" if fastest else "",
                    "peak extra GiB": "" if peak is None else f"{peak / 2 ** 30:.2f}",
                    "memory vs bound": "" if peak is None else f"{peak / bound:.2f}"})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b,gemma2-2b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, notes = [], []
    for shape in args.shape.split(","):
        shape_rows, bound, k = run_shape(shape, device, dtype, args.repeats)
        rows += table_rows(shape, shape_rows, bound)
        notes.append(f"{shape} (N, H, V) = {SHAPES[shape]}: K = {k:.0f} distinct label ids, "
                     f"lower bound {bound / 2 ** 30:.2f} GiB")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    publish(f"Device: {name}, torch {torch.__version__}, {dtype}; median of {args.repeats} interleaved rounds after warm-up. "
            + "; ".join(notes) + ".", rows, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
