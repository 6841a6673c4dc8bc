"""Memory the fused head keeps between calls (CPU): the resident set after one forward+backward at a
Llama-3-sized head (V=128256, H=4096), with the gradients held, after they are dropped, and after
``seqloss.release_workspaces()`` — from the main thread, and with the step run in a worker thread
that stays alive (a trainer's thread pool) and the release called from the main one. The kept workspaces stay within the per-process budget
(``seqloss.set_workspace_budget``, 512 MiB by default): a weight gradient of 2.1 GB is never kept.

    python benchmarks/bench_workspaces.py [--positions 64] [--budget BYTES] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import gc
from concurrent.futures import ThreadPoolExecutor

import torch

import seqloss
from common import machine, publish

V, H = 128256, 4096
MIB = 1 << 20


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--budget", type=int, default=None, help="seqloss.set_workspace_budget(BYTES) first")
    p.add_argument("--markdown")
    args = p.parse_args()
    if args.budget is not None:
        seqloss.set_workspace_budget(args.budget)
    torch.manual_seed(0)
    weight = (torch.randn(V, H) * H ** -0.5).requires_grad_(True)
    hidden = torch.randn(1, args.positions, H, requires_grad=True)
    labels = torch.randint(0, V, (1, args.positions))
    rows = []
    for where in ("main thread", "worker thread"):
        gc.collect()
        base = rss_mib()

        def step() -> None:
            seqloss.linear_loss(hidden, weight, labels).backward()

        pool = ThreadPoolExecutor(1)  # a worker that outlives the step, as a trainer's threads do
        if where == "main thread":
            step()
        else:
            pool.submit(step).result()
        held = rss_mib() - base
        weight.grad = hidden.grad = None
        gc.collect()
        dropped = rss_mib() - base
        kept = seqloss.kept_workspace_bytes() / MIB
        seqloss.release_workspaces()
        gc.collect()
        released = rss_mib() - base
        pool.shutdown()
        rows.append({"step run in": where, "gradients held (MiB)": f"{held:.0f}",
                     "gradients dropped (MiB)": f"{dropped:.0f}", "kept workspaces (MiB)": f"{kept:.0f}",
                     "after release_workspaces() in the main thread (MiB)": f"{released:.0f}"})
    budget = seqloss.set_workspace_budget(0)
    seqloss.set_workspace_budget(budget)
    publish(f"Resident memory above the inputs after one fused MLE step: V={V}, H={H}, {args.positions} positions, "
            f"fp32 (the weight gradient alone is {V * H * 4 / MIB:.0f} MiB); workspace budget {budget / MIB:.0f} MiB\n"
            f"{machine()}", rows, args.markdown)


if __name__ == "__main__":
    main()
