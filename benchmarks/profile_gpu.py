"""Where the fused head's time goes on a GPU, for the next round of kernel work (issue #20):

1. ``--profile``: torch.profiler's table of device time by kernel for chosen providers of
   ``bench_gpu.py`` at chosen shapes (one forward+backward after warm-up);
2. ``--products``: the list part's three cuBLAS products (logits, hidden and weight gradients) at a
   list length K as given and padded to a multiple of 8, with fp32 and bf16 results;
3. ``--cprofile``: the host's side of the same providers' steps (cProfile, by own time): where a step
   whose device time is short spends its wall time (launches, synchronisations);
4. ``--sweep``: the fused kernels' tile shapes for MLE ("m,c,h[,warps,stages]" separated by ';'),
   each timed interleaved with Cut Cross-Entropy where it is installed; a shape that fails to compile
   is listed with its error.

    python benchmarks/profile_gpu.py --shape llama3-8b --profile "smile/seqloss triton" --products 2701 \\
        --sweep "64,128,64;128,128,64,8,3"

``--device cpu --shape tiny`` runs the same code through Triton's interpreter (TRITON_INTERPRET=1), so
that the script itself is tested.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch

from bench_gpu import SHAPES, Clock, _step, interleaved, providers, seqloss_fused, with_blocks
from common import zipf_labels


def inputs(shape: str, device: torch.device, dtype: torch.dtype):
    B, N, H, V = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(B, N, H, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(device, dtype)
    return hidden, weight, zipf_labels((B, N), V, pad_fraction=0.0).to(device)


def profile(shape: str, names: list[str], device: torch.device, dtype: torch.dtype, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile as profiler
    hidden, weight, labels = inputs(shape, device, dtype)
    known = providers()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in names:
        fn = known.get(name)
        if fn is None:
            print(f"\n## {shape} {name}: not installed or unknown")
            continue
        step = _step(fn, hidden, weight, labels)
        clock = Clock(device)
        warm = [clock.time(step) for _ in range(2)]
        with profiler(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n## {shape} {name}: warm-up steps {', '.join(f'{t:.2f}' for t in warm)} ms")
        averages = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        try:
            print(averages.table(sort_by=key, row_limit=rows, max_name_column_width=70))
        except (AttributeError, KeyError):
            print(averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70))


def host_profile(shape: str, names: list[str], device: torch.device, dtype: torch.dtype, rows: int) -> None:
    import cProfile
    import pstats
    hidden, weight, labels = inputs(shape, device, dtype)
    known = providers()
    for name in names:
        fn = known.get(name)
        if fn is None:
            continue
        step = _step(fn, hidden, weight, labels)
        clock = Clock(device)
        for _ in range(2):
            clock.time(step)
        profiler = cProfile.Profile()
        profiler.enable()
        walls = [clock.time(step) for _ in range(5)]
        profiler.disable()
        print(f"\n## {shape} {name}: host profile of 5 steps ({', '.join(f'{t:.2f}' for t in walls)} ms)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(rows)


def products(K: int, shape: str, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    """The grouped products at one group of the shape's positions and K listed ids, K as given and padded."""
    _, N, H, _ = SHAPES[shape]
    clock = Clock(device)
    print(f"\n## list products, M={N}, H={H}: median ms of {repeats} interleaved (fp32 results where torch has them)")
    print("| K | logits h@W_ids.T | hidden grad G@W_ids | weight grad G.T@h |")
    print("|---|---|---|---|")
    for k in (K, -(-K // 8) * 8):
        h = torch.randn(1, N, H, device=device, dtype=dtype)
        w = torch.randn(1, k, H, device=device, dtype=dtype)
        g = torch.randn(1, N, k, device=device, dtype=dtype)

        def mm(a: torch.Tensor, b: torch.Tensor) -> Callable[[], None]:
            def run() -> None:
                try:
                    torch.bmm(a, b, out_dtype=torch.float32)
                except (TypeError, RuntimeError, NotImplementedError):
                    torch.bmm(a, b)
            return run
        steps = {"z": mm(h, w.transpose(1, 2)), "dh": mm(g, w), "dw": mm(g.transpose(1, 2), h)}
        times = interleaved(steps, repeats, clock)
        print(f"| {k} | " + " | ".join(f"{statistics.median(times[s]):.3f}" for s in steps) + " |")


def sweep(shape: str, configs: list[str], device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    hidden, weight, labels = inputs(shape, device, dtype)
    clock = Clock(device)
    steps, failed = {}, {}
    peer = providers().get("mle/cut cross-entropy")
    if peer is not None:
        steps["cut cross-entropy"] = _step(peer, hidden, weight, labels)
    for config in configs:
        step = _step(with_blocks(seqloss_fused("mle", "triton"), config), hidden, weight, labels)
        try:
            clock.time(step)
        except Exception as error:  # a tile shape the compiler refuses (shared memory, registers)
            failed[config] = str(error).strip().splitlines()[0][:100] if str(error).strip() else type(error).__name__
            continue
        steps[config] = step
    times = interleaved(steps, repeats, clock)
    print(f"\n## MLE tile sweep at {shape}: median ms of {repeats} interleaved rounds")
    print("| blocks m,c,h[,warps,stages] | ms |")
    print("|---|---|")
    for name in steps:
        print(f"| {name} | {statistics.median(times[name]):.2f} |")
    for name, error in failed.items():
        print(f"| {name} | failed: {error} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", default="", help="providers of bench_gpu.py, separated by ','")
    parser.add_argument("--cprofile", default="", help="providers whose host side to profile, separated by ','")
    parser.add_argument("--rows", type=int, default=14, help="kernels listed per profile")
    parser.add_argument("--products", type=int, default=0, help="a list length K for the products' timing")
    parser.add_argument("--sweep", default="", help="MLE tile shapes, separated by ';'")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in args.shape.split(","):
        if args.profile:
            profile(shape, [p for p in args.profile.split(",") if p], device, dtype, args.rows)
        if args.cprofile:
            host_profile(shape, [p for p in args.cprofile.split(",") if p], device, dtype, args.rows)
        if args.products:
            products(args.products, shape, device, dtype, args.repeats)
        if args.sweep:
            sweep(shape, [c for c in args.sweep.split(";") if c], device, dtype, args.repeats)


if __name__ == "__main__":
    main()
