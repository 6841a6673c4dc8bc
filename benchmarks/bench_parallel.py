"""What a vocabulary-parallel loss sends: every collective of one call (forward and backward), per
objective, on 2 gloo processes — against Megatron-LM's vocab-parallel cross-entropy, which sends
three (B, N) fp32 all-reduces (the max, the label's logit, the sum of exponentials).

    python benchmarks/bench_parallel.py [--batch 4 --length 512 --vocab 4096]

Byte counts do not depend on the vocabulary's size (nothing of its size is sent); the vocabulary
here only has to hold the labels.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqloss

OBJECTIVES: list[tuple[str, Any, dict[str, Any]]] = [
    ("mle", "mle", {}),
    ("mle, label smoothing 0.1", "mle", {"label_smoothing": 0.1}),
    ("smile", "smile", {}),
    ("smile, return_stats", "smile", {"return_stats": True}),
    ("random_subset", "random_subset", {}),
    ("reverse_subset", "reverse_subset", {}),
    ("selective_eos", "selective_eos", {"eos_token_id": 2}),
    ("mle=0.01,smile=0.99", {"mle": 0.01, "smile": 0.99}, {}),
]


def _count(objective: Any, options: dict[str, Any], B: int, N: int, V: int) -> list[tuple[str, int]]:
    seen: list[tuple[str, int]] = []
    original = dist.all_reduce

    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((str(kwargs.get("op", "SUM")).rsplit(".", 1)[-1], tensor.numel() * tensor.element_size()))
        return original(tensor, *args, **kwargs)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, N, V, generator=g)
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[:, :N // 8] = -100                                       # a prompt, as in fine-tuning
    shard = seqloss.VocabParallel.even(V)
    part = logits[..., shard.start:shard.stop].clone().requires_grad_(True)
    if objective == "random_subset":
        options = {**options, "generator": torch.Generator().manual_seed(1)}
    dist.all_reduce = all_reduce
    try:
        out = seqloss.objective_loss(part, labels, objective, shift=True, vocab_parallel=shard, **options)
        (out.loss if isinstance(out, seqloss.LossStats) else out).backward()
    finally:
        dist.all_reduce = original
    return seen


def worker(rank: int, port: int, args: Any, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    rows = [(name, _count(objective, options, args.batch, args.length, args.vocab))
            for name, objective, options in OBJECTIVES]
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=worker, args=(rank, port, args, out)) for rank in range(2)]
    for p in processes:
        p.start()
    rows = out.get(timeout=600)
    for p in processes:
        p.join()
    megatron = 3 * args.batch * args.length * 4
    print(f"B={args.batch}, N={args.length} (prompt N/8 ignored), 2 ranks; Megatron's MLE: 3 all-reduces, "
          f"{megatron:,} bytes\n")
    print("| objective | all-reduces (op: bytes) | bytes | vs Megatron |")
    print("|---|---|---|---|")
    for name, seen in rows:
        total = sum(size for _, size in seen)
        ops = ", ".join(f"{op}: {size:,}" for op, size in seen)
        print(f"| {name} | {len(seen)} ({ops}) | {total:,} | {total / megatron:.2f}× |")


if __name__ == "__main__":
    sys.exit(main())
