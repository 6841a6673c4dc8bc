"""GPU fused-head benchmark: the Triton kernels against Liger-Kernel, Cut Cross-Entropy, torch's
chunked ``F.linear_cross_entropy`` and HF-style full logits, at Llama-3-8B's and Gemma-2-2B's heads
(one row of 8192 positions) and at Llama-3's head in a batch of 8 rows × 1024 with their own supports;
and the logits path on given Llama-3-sized logits (torch's cross-entropy and seqloss's two engines).

Forward+backward with gradients for hidden and weight, bf16, Zipf-distributed labels. Time: median of
``--repeats`` rounds after warm-up, providers interleaved in each round, with CUDA events. Memory: the allocator's peak above the inputs,
against the lower bound of the two gradients (weight and hidden, in the inputs' dtype). The FLOP
bound of each objective (6·positions·H·ids of its support: V for MLE, each row's K distinct labels
for SMILE plus its first position's V) at the device's dense bf16 peak (``--peak-tflops``; known
for H100/H200) is printed beside each time. Peers that are not installed are listed as skipped.
``--shape tiny --device cpu`` runs the same code through Triton's interpreter (set
TRITON_INTERPRET=1 before starting) so that the script itself is tested.

    python benchmarks/bench_gpu.py [--shape llama3-8b,gemma2-2b,llama3-8b-rows] [--repeats 5] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import seqloss
from common import distinct_per_row, publish, zipf_labels
from seqloss.kernels.parts import BLOCKS_VARIABLE

# (rows, positions per row, H, V)
SHAPES = {"llama3-8b": (1, 8192, 4096, 128256), "gemma2-2b": (1, 8192, 2304, 256000),
          "llama3-8b-rows": (8, 1024, 4096, 128256), "tiny": (2, 24, 32, 200)}
# Dense bf16 tensor-core peaks (TFLOPS, no sparsity) by device name.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def hf_naive(h, W, y):
    return F.cross_entropy((h @ W.t()).float().flatten(0, -2), y.flatten(), ignore_index=-100)


def torch_chunked() -> Optional[Callable]:
    if not hasattr(F, "linear_cross_entropy"):  # added in torch 2.13
        return None
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, W, y: F.linear_cross_entropy(h.flatten(0, -2), W, y.flatten(), ignore_index=-100, options=options)


def liger() -> Optional[Callable]:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return lambda h, W, y: liger_fused_linear_cross_entropy(h.flatten(0, -2), W, y.flatten())


def cut_cross_entropy() -> Optional[Callable]:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None
    return lambda h, W, y: linear_cross_entropy(h.flatten(0, -2), W, y.flatten())


def seqloss_fused(objective: str, impl: str, **options) -> Callable:
    """(rows, positions, H) hidden states: SMILE's support is each row's own."""
    return lambda h, W, y: seqloss.linear_loss(h, W, y, objective=objective, impl=impl, **options)


def with_blocks(fn: Callable, blocks: str) -> Callable:
    """``fn`` with the fused head's tile shape set to ``blocks`` ("m,c,h[,warps,stages]") while it runs."""
    def run(h, W, y):
        previous = os.environ.get(BLOCKS_VARIABLE)
        os.environ[BLOCKS_VARIABLE] = blocks
        try:
            return fn(h, W, y)
        finally:
            if previous is None:
                os.environ.pop(BLOCKS_VARIABLE)
            else:
                os.environ[BLOCKS_VARIABLE] = previous
    return run


def providers(blocks: tuple[str, ...] = ()) -> dict[str, Optional[Callable]]:
    sweep = {f"mle/seqloss triton blocks={b}": with_blocks(seqloss_fused("mle", "triton"), b) for b in blocks}
    return sweep | {"mle/hf naive": hf_naive, "mle/torch chunked": torch_chunked(), "mle/liger": liger(),
            "mle/cut cross-entropy": cut_cross_entropy(), "mle/seqloss triton": seqloss_fused("mle", "triton"),
            "mle/seqloss triton exact": seqloss_fused("mle", "triton", exact_accumulation=True),
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


def support_flops(labels: torch.Tensor, H: int, V: int) -> dict[str, float]:
    """Forward+backward FLOPs of each objective on the fused head: 6·H per (position, scored id)."""
    mle = 6.0 * H * V * int((labels >= 0).sum())
    smile = 0.0
    for row in labels:
        kept = row[row >= 0]
        if kept.numel():
            smile += 6.0 * H * (V + (kept.numel() - 1) * (len(set(kept.tolist())) + 1))
    return {"mle": mle, "smile": smile}


def run_shape(name: str, device: torch.device, dtype: torch.dtype, repeats: int, blocks: tuple[str, ...] = ()):
    B, N, H, V = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(B, N, H, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype)
    labels = zipf_labels((B, N), V, pad_fraction=0.0).to(device)
    clock = Clock(device)
    bound = (V * H + B * N * H) * hidden.element_size()
    steps = {provider: _step(fn, hidden, weight, labels) for provider, fn in providers(blocks).items()
             if fn is not None}
    # Interleaved (A B A B ...), as a training loop interleaves work: repeating one provider alone
    # keeps its buffers and caches warm and can flatter it. The warm-up compiles the kernels.
    times = interleaved(steps, repeats, clock)
    rows = []
    for provider in providers(blocks):
        if provider not in steps:
            rows.append(dict(name=provider, skipped="not installed"))
        else:
            rows.append(dict(name=provider, ms=statistics.median(times[provider]),
                             peak=clock.peak_extra(steps[provider])))
    return rows, bound, distinct_per_row(labels.cpu()), support_flops(labels.cpu(), H, V)


def logits_providers() -> dict[str, Callable]:
    """The logits path (B, N, V) logits given: torch's cross-entropy against seqloss's two engines,
    which decides what ``impl="auto"`` should pick there on a GPU."""
    def ce(x, y):
        return F.cross_entropy(x.flatten(0, -2).float(), y.flatten(), ignore_index=-100)

    def ours(objective: str, impl: str) -> Callable:
        return lambda x, y: seqloss.objective_loss(x, y, objective, impl=impl)
    return {"mle/F.cross_entropy": ce, "mle/seqloss torch": ours("mle", "torch"),
            "mle/seqloss triton": ours("mle", "triton"), "smile/seqloss torch": ours("smile", "torch"),
            "smile/seqloss triton": ours("smile", "triton")}


def run_logits(name: str, device: torch.device, dtype: torch.dtype, repeats: int):
    """Forward+backward on given logits at a shape's (rows, N, V): each provider's median ms and peak
    above the logits, against the logits' gradient as the bound."""
    B, N, _, V = SHAPES[name]
    logits = (torch.randn(B, N, V, generator=torch.Generator().manual_seed(1)) * 2).to(device, dtype)
    labels = zipf_labels((B, N), V, pad_fraction=0.0).to(device)
    clock = Clock(device)

    def step_of(fn: Callable) -> Callable[[], None]:
        return lambda: fn(logits.detach().requires_grad_(True), labels).backward()
    steps = {provider: step_of(fn) for provider, fn in logits_providers().items()}
    times = interleaved(steps, repeats, clock)
    rows = [dict(name=p, ms=statistics.median(times[p]), peak=clock.peak_extra(steps[p])) for p in steps]
    return rows, logits.numel() * logits.element_size()


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, clock: Clock) -> dict[str, list]:
    """One warm-up call each, then ``repeats`` rounds timing every step in turn (A B A B ...)."""
    for step in steps.values():
        clock.time(step)
    times: dict[str, list] = {provider: [] for provider in steps}
    for _ in range(repeats):
        for provider, step in steps.items():
            times[provider].append(clock.time(step))
    return times


COLUMNS = ("shape", "objective", "provider", "fwd+bwd ms", "vs fastest MLE peer", "FLOP-bound ms", "x bound",
           "peak extra GiB", "memory vs bound")


def table_rows(shape: str, rows, bound, flops: dict[str, float], peak_tflops: Optional[float]):
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
        floor = flops[objective] / (peak_tflops * 1e9) if peak_tflops and flops.get(objective) else None  # ms
        out.append({**row, "fwd+bwd ms": f"{r['ms']:.2f}",
                    "vs fastest MLE peer": f"{fastest / r['ms']:.2f}x" if fastest else "",
                    "FLOP-bound ms": "" if floor is None else f"{floor:.2f}",
                    "x bound": "" if floor is None else f"{r['ms'] / floor:.1f}",
                    "peak extra GiB": "" if peak is None else f"{peak / 2 ** 30:.2f}",
                    "memory vs bound": "" if peak is None else f"{peak / bound:.2f}"})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b,gemma2-2b,llama3-8b-rows")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--logits-shape", default="llama3-8b", help="shapes of the logits-path rows ('' for none)")
    parser.add_argument("--blocks", default="", help="fused tile shapes to time MLE with besides the default, "
                        "'m,c,h[,warps,stages]' separated by ';' (profiling)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for the FLOP bound (default: known for H100/H200, else none)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    rows, notes = [], []
    for shape in args.shape.split(","):
        shape_rows, bound, k, flops = run_shape(shape, device, dtype, args.repeats,
                                                tuple(b for b in args.blocks.split(";") if b))
        rows += table_rows(shape, shape_rows, bound, flops, peak)
        notes.append(f"{shape} (rows, N, H, V) = {SHAPES[shape]}: K = {k:.0f} distinct label ids per row, "
                     f"lower bound {bound / 2 ** 30:.2f} GiB")
    for shape in filter(None, args.logits_shape.split(",")):
        logit_rows, bound = run_logits(shape, device, dtype, args.repeats)
        rows += table_rows(f"{shape} logits", logit_rows, bound, {}, peak)
        notes.append(f"{shape} logits: the (rows, N, V) logits given, bound = their gradient, {bound / 2 ** 30:.2f} GiB")
    notes.append(f"FLOP bound at {peak:g} dense bf16 TFLOPS" if peak else "no FLOP bound (peak unknown)")
    publish(f"Device: {name}, torch {torch.__version__}, {dtype}; median of {args.repeats} interleaved rounds after warm-up. "
            + "; ".join(notes) + ".", rows, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
