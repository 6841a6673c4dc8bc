"""``seqloss bench``: forward+backward time of every objective on this machine, as a table.

Shipped with the package (it needs torch only), so an installed seqloss can say what it costs where
it runs. Providers are timed in turn (A B A B ...) in every round, as a training loop interleaves
work; the median of ``repeats`` rounds is reported, with each objective's ratio to torch's own MLE
(``F.cross_entropy`` on logits, ``F.linear`` + ``F.cross_entropy`` for the fused head) measured in
the same run. The scripts under ``benchmarks/`` (a source checkout) measure more: peers, peak
memory, training steps, GPUs.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import functional
from .objectives import objective_name, parse_objective
from .settings import BENCH_SHAPES

OBJECTIVES = ("mle", "smile", "random_subset", "reverse_subset", "selective_eos", "mle=0.01,smile=0.99")


def zipf_labels(shape: Sequence[int], vocab_size: int, *, exponent: float = 1.1, pad_fraction: float = 0.25,
                seed: int = 0) -> torch.Tensor:
    """Token ids with a Zipf law over a shuffled vocabulary, right-padded with -100.

    Each row keeps a random length between (1 - pad_fraction)·N and N, like captions in a batch.
    """
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = ranks.pow(-exponent)
    flat = torch.multinomial(probs / probs.sum(), int(torch.tensor(shape).prod()), replacement=True, generator=g)
    labels = torch.randperm(vocab_size, generator=g)[flat].reshape(*shape)
    *lead, N = shape
    lengths = torch.randint(int(N * (1 - pad_fraction)), N + 1, tuple(lead), generator=g)
    labels[torch.arange(N).expand(*shape) >= lengths.unsqueeze(-1)] = -100
    return labels


def distinct_per_row(labels: torch.Tensor) -> float:
    """Mean number of distinct supervised ids per row (the K of SMILE's support)."""
    rows = labels.reshape(-1, labels.shape[-1])
    return statistics.mean(len(set(r[r >= 0].tolist())) for r in rows)


def interleaved_median_ms(steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds of each step, the steps timed in turn (A B A B ...) in every round.

    A training loop interleaves work; repeating one provider alone keeps its buffers and caches warm
    and can flatter it several-fold, so providers are never timed in a block of their own.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def steps(shape: str, fused: bool, objectives: Sequence[str] = OBJECTIVES) -> dict[str, Callable[[], None]]:
    """One forward+backward per provider (gradients dropped first, as an optimiser step leaves them):
    torch's MLE, then each objective through seqloss."""
    B, N, V, H = BENCH_SHAPES[shape]
    labels = zipf_labels((B, N), V)
    hidden = torch.randn(B, N, H, requires_grad=True)
    weight = (torch.randn(V, H) * H ** -0.5).requires_grad_(True)
    logits = torch.randn(B, N, V, requires_grad=True)
    leaves = (hidden, weight) if fused else (logits,)

    def fresh() -> None:
        for leaf in leaves:
            leaf.grad = None

    def torch_mle() -> None:
        fresh()
        scores = F.linear(hidden[:, :-1], weight) if fused else logits[:, :-1]
        F.cross_entropy(scores.reshape(-1, V), labels[:, 1:].reshape(-1)).backward()

    def seqloss_step(objective: Any) -> Callable[[], None]:
        options: dict[str, Any] = {"eos_token_id": V - 1} if "selective_eos" in objective_name(objective) else {}

        def step() -> None:
            fresh()
            if fused:
                functional.linear_loss(hidden, weight, labels, objective=objective, shift=True, **options).backward()
            else:
                functional.objective_loss(logits, labels, objective, shift=True, **options).backward()
        return step

    out = {"torch MLE": torch_mle}
    out.update({f"seqloss {name}": seqloss_step(parse_objective(name)) for name in objectives})
    return out


def table(shape: str = "small", fused: bool = False, repeats: int = 5) -> str:
    """The markdown table of one shape: median ms and the ratio to torch's MLE, per provider."""
    B, N, V, H = BENCH_SHAPES[shape]
    times = interleaved_median_ms(steps(shape, fused), repeats)
    base = times["torch MLE"]
    what = f"fused head, H={H}" if fused else "logits"
    lines = [f"{shape}: B={B}, N={N}, V={V}, {what}; median of {repeats} interleaved rounds, "
             f"{torch.get_num_threads()} threads", "", "| provider | ms | × torch MLE |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / base:.2f} |" for name, ms in times.items()]
    return "\n".join(lines)
