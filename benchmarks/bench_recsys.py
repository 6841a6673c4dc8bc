"""Sequential recommendation at catalogue scale: sampled softmax against the fused full softmax.

Two tables.

1. **Speed and memory** at ``--items`` (1,000,000), H = ``--hidden`` (64), ``--targets`` (4096)
   supervised positions with Zipf labels and ``--negatives`` (1024): one forward+backward of
   ``seqloss.linear_loss(objective="mle")`` (the full softmax, fused: no (T, V) logits) and of
   ``seqloss.sampled_softmax_loss`` with each sampler (negatives shared by the batch, and one set per
   position for the uniform sampler). Gradients for hidden and weight. Time: the median of
   ``--repeats`` rounds, providers interleaved (A B A B); peak extra memory: the resident-set
   high-water mark of one forward+backward in a fresh process (CPU), or ``max_memory_allocated``
   (CUDA), over the inputs.
2. **Recall@10** of next-item models trained with each loss on walks of a generated Markov chain
   (``examples/markov_sessions.py``: each item has three likely successors, popularity follows a
   Zipf law, ids sorted by popularity) over ``--recall-items`` items: item embedding → scores
   against an output table, trained for ``--recall-steps`` Adam steps of ``--recall-batch``
   transitions, evaluated on the transitions of held-out walks. Providers: full softmax, and
   ``--recall-sampler`` sampled softmax without and with the log-Q correction. A full softmax over
   1M items costs seconds per step on a CPU, so the recall catalogue is its own option (use the
   full size on a GPU).

    python benchmarks/bench_recsys.py [--items 1000000] [--repeats 3] [--recall-items 20000] [--device cuda]

On a 2-core CPU one full-softmax forward+backward at the default size takes about two minutes and
peaks about 1.3 GiB above its inputs (the whole run stays under 2 GiB resident), so the speed table
takes some ten minutes; sampled softmax takes well under a second. The recall table takes a few
minutes (the full softmax's training most of it).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import seqloss
from common import PeakRSS, interleaved_median_ms, machine, peak_extra_in_fresh_process, publish, zipf_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from markov_sessions import markov_chain, markov_sessions, transitions  # noqa: E402

Loss = Callable[[Tensor, Tensor, Tensor], Tensor]


def sampled(negatives: int, sampler: str, **options) -> Loss:
    g = torch.Generator().manual_seed(0)
    return lambda h, W, y: seqloss.sampled_softmax_loss(h, W, y, num_negatives=negatives, sampler=sampler,
                                                        generator=g, **options)


def providers(negatives: int) -> dict[str, Loss]:
    return {
        "full softmax (linear_loss mle)": lambda h, W, y: seqloss.linear_loss(h, W, y),
        "sampled uniform": sampled(negatives, "uniform"),
        "sampled log_uniform": sampled(negatives, "log_uniform"),
        "sampled in_batch": sampled(negatives, "in_batch"),
        "sampled uniform, per position": sampled(negatives, "uniform", share_negatives=False),
    }


# --- 1. speed and memory ------------------------------------------------------------------------


def inputs(items: int, hidden: int, targets: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(targets, hidden, generator=g).to(device)
    W = (torch.randn(items, hidden, generator=g) * hidden ** -0.5).to(device)
    return h, W, zipf_labels((targets,), items, pad_fraction=0.0).to(device)


def step(loss: Loss, h: Tensor, W: Tensor, y: Tensor) -> None:
    hh, WW = h.detach().requires_grad_(True), W.detach().requires_grad_(True)
    loss(hh, WW, y).backward()
    if h.is_cuda:
        torch.cuda.synchronize()


def measure_memory(name: str, case: str) -> None:
    """Fresh-process CPU measurement: one forward+backward of ``name`` under ``PeakRSS``."""
    items, hidden, targets, negatives = (int(x) for x in case.split(","))
    h, W, y = inputs(items, hidden, targets, "cpu")
    with PeakRSS() as peak:
        step(providers(negatives)[name], h, W, y)
    print(json.dumps({"peak_extra": peak.extra_bytes}))


def peak_mib(name: str, loss: Loss, case: str, h: Tensor, W: Tensor, y: Tensor) -> float:
    if h.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(loss, h, W, y)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_extra_in_fresh_process(__file__, [name, case])["peak_extra"] / 2**20


def speed_table(args: argparse.Namespace) -> list[dict]:
    h, W, y = inputs(args.items, args.hidden, args.targets, args.device)
    losses = providers(args.negatives)
    ms = interleaved_median_ms({name: functools.partial(step, loss, h, W, y) for name, loss in losses.items()},
                               args.repeats)
    case = f"{args.items},{args.hidden},{args.targets},{args.negatives}"
    full = ms["full softmax (linear_loss mle)"]
    rows = []
    for name, loss in losses.items():
        rows.append({"provider": name, "fwd+bwd ms": f"{ms[name]:.1f}",
                     "peak extra MiB": f"{peak_mib(name, loss, case, h, W, y):.0f}",
                     "speed-up vs full": f"{full / ms[name]:.1f}x"})
    return rows


# --- 2. recall@10 on Markov-chain sessions -------------------------------------------------------


def train_and_recall(loss: Loss, cur: Tensor, nxt: Tensor, test_cur: Tensor, test_nxt: Tensor, items: int,
                     args: argparse.Namespace) -> tuple[float, float, float]:
    """Train item embedding E and output table W with ``loss``; recall@10, NDCG@10 and seconds."""
    torch.manual_seed(args.seed)
    E = (torch.randn(items, args.hidden) * 0.1).to(args.device).requires_grad_(True)
    W = (torch.randn(items, args.hidden) * 0.1).to(args.device).requires_grad_(True)
    optimizer = torch.optim.Adam([E, W], lr=args.recall_lr)
    g = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.recall_steps):
        rows = torch.randint(len(cur), (args.recall_batch,), generator=g).to(args.device)
        optimizer.zero_grad(set_to_none=True)
        loss(E[cur[rows]], W, nxt[rows]).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    hits, gains = 0.0, 0.0
    with torch.no_grad():
        for part in range(0, len(test_cur), 2048):
            scores = E[test_cur[part:part + 2048]] @ W.t()                          # (M, items)
            target = test_nxt[part:part + 2048]
            rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(1)          # 0 = first
            hit = rank < 10
            hits += float(hit.sum())
            gains += float(torch.where(hit, 1.0 / torch.log2(rank.double() + 2), 0.0).sum())
    return hits / len(test_cur), gains / len(test_cur), seconds


def recall_table(args: argparse.Namespace) -> list[dict]:
    items = args.recall_items
    chain = markov_chain(items, seed=args.seed)
    # About ten transitions per walk: enough walks that training rarely sees one twice.
    train = markov_sessions(chain, max(args.recall_steps * args.recall_batch // 10, 1000), 20, seed=args.seed + 1)
    test = markov_sessions(chain, args.recall_test, 20, seed=args.seed + 2)
    # Class ids are item ids - 1: the most popular item is class 0, as the log-uniform sampler assumes.
    cur, nxt = (t.sub(1).to(args.device) for t in transitions(train))
    test_cur, test_nxt = (t.sub(1).to(args.device) for t in transitions(test))
    K, sampler = args.recall_negatives, args.recall_sampler
    losses = {
        "full softmax": lambda h, W, y: seqloss.linear_loss(h, W, y),
        f"sampled {sampler}, K={K}, no log-Q": sampled(K, sampler, log_q_correction=False),
        f"sampled {sampler}, K={K}, log-Q": sampled(K, sampler),
    }
    results = {name: train_and_recall(loss, cur, nxt, test_cur, test_nxt, items, args)
               for name, loss in losses.items()}
    full = results["full softmax"][0]
    return [{"loss": name, "recall@10": f"{r:.3f}", "NDCG@10": f"{n:.3f}", "vs full": f"{r / full:.2f}",
             "train s": f"{s:.0f}"} for name, (r, n, s) in results.items()]


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--targets", type=int, default=4096)
    p.add_argument("--negatives", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--recall-items", type=int, default=20_000)
    p.add_argument("--recall-steps", type=int, default=300)
    p.add_argument("--recall-batch", type=int, default=1024)
    p.add_argument("--recall-negatives", type=int, default=256)
    p.add_argument("--recall-sampler", default="log_uniform", choices=["uniform", "log_uniform", "in_batch"])
    p.add_argument("--recall-lr", type=float, default=0.01)
    p.add_argument("--recall-test", type=int, default=2000, help="held-out walks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-recall", action="store_true")
    p.add_argument("--markdown", help="also write the tables to this file")
    p.add_argument("--measure-memory", nargs=2, metavar=("PROVIDER", "CASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure_memory:
        return measure_memory(*args.measure_memory)
    where = f"{machine()}, device {args.device}"
    if not args.skip_speed:
        publish(f"Sampled softmax against the fused full softmax. {where}. V={args.items:,}, H={args.hidden}, "
                f"T={args.targets} Zipf labels, K={args.negatives} negatives, fp32; median of {args.repeats} "
                "interleaved rounds of forward+backward (gradients for hidden and weight); peak extra memory over "
                "the inputs.", speed_table(args), args.markdown)
    if not args.skip_recall:
        ideal = 1 - 0.1  # the chain's noise: one next item in ten is a random (Zipf) item
        rows = recall_table(args)
        publish(f"\nRecall@10 of next-item models on Markov-chain walks. {where}. {args.recall_items:,} items, "
                f"H={args.hidden}, {args.recall_steps} Adam steps (lr {args.recall_lr}) of {args.recall_batch} "
                f"transitions; {args.recall_test} held-out walks. A perfect model of the chain: about {ideal:.1f}; "
                f"chance: {10 / args.recall_items:.4f}.", rows, args.markdown + ".recall.md" if args.markdown else None)
    return None


if __name__ == "__main__":
    sys.exit(main())
