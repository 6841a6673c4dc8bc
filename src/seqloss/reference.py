"""The dense spec of every objective: readable, slow, the oracle of every test.

Each objective is a boolean support mask over the vocabulary, built the way the papers and the
SMILE authors' code build it, then one masked log-softmax:

    loss(b, n) = logsumexp_{v in S(b,n)} z[b,n,v] - z[b,n,y]                 (y = label at (b, n))

with label smoothing ε spread over the support:
    (1 - ε) · (-log p_y) + ε · mean_{v in S(b,n)} (-log p_v).

This module materialises (B, N, V) masks and masked copies of the logits on purpose; the engines
never do. It builds every mask from the labels alone and imports nothing from the code it checks
(the shift, the first supervised position and the random draws are written out again here).
Inputs are already validated and flattened: logits (B, N, V), labels (B, N) unshifted.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class Targets:
    """Shifted labels of a (B, N) batch."""

    labels: Tensor       # (B, N) long, ignore_index where there is no target
    target_mask: Tensor  # (B, N) bool, True = has a target
    vocab_size: int
    shift: bool


def targets(labels: Tensor, vocab_size: int, shift: bool, ignore_index: int) -> Targets:
    """Position n predicts ``labels[n + 1]`` when ``shift`` (the last position has no target)."""
    labels = labels.long()
    if shift:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
    return Targets(labels, labels != ignore_index, vocab_size, shift)


def first_supervised(target_mask: Tensor) -> Tensor:
    """(B, N) bool: the first position of each row with a target."""
    targets_so_far = target_mask.long().cumsum(dim=1)                 # (B, N)
    return target_mask & (targets_so_far == 1)


def random_draws(shape: tuple[int, int], vocab_size: int, num_samples: int,
                 generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(B, N, num_samples) ids uniform in [0, V) with replacement, drawn on the generator's device
    (CPU without one), as the library promises: the same generator gives the same draws."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(vocab_size, (*shape, num_samples), generator=generator, device=gen_device).to(device)


def _row_token_mask(t: Targets) -> Tensor:
    """(B, V) bool: the ids that occur as supervised labels in each row (ignored labels never leak)."""
    B = t.labels.shape[0]
    mask = torch.zeros(B, t.vocab_size + 1, dtype=torch.bool, device=t.labels.device)
    ids = torch.where(t.target_mask, t.labels, t.vocab_size)  # ignored → a spare column, dropped below
    mask.scatter_(1, ids, True)
    return mask[:, : t.vocab_size]


def _with_label(t: Targets, support: Tensor) -> Tensor:
    """The label is always in its own support (never an infinite loss)."""
    safe = torch.where(t.target_mask, t.labels, 0)
    return support.scatter(2, safe.unsqueeze(-1), True)


def _without(ids: Sequence[int], support: Tensor) -> Tensor:
    support = support.clone()
    support[..., list(ids)] = False
    return support


def mle_mask(t: Targets) -> Tensor:
    B, N = t.labels.shape
    return torch.ones(B, N, t.vocab_size, dtype=torch.bool, device=t.labels.device)


def smile_mask(t: Targets, *, first_token_mle: bool = True, exclude_ids: Sequence[int] = ()) -> Tensor:
    N = t.labels.shape[1]
    support = _row_token_mask(t).unsqueeze(1).expand(-1, N, -1)   # (B, N, V)
    support = _with_label(t, _without(exclude_ids, support))
    if first_token_mle:
        support = support | first_supervised(t.target_mask).unsqueeze(-1)
    return support


def random_subset_mask(t: Targets, *, num_samples: int = 10, generator: Optional[torch.Generator] = None,
                       exclude_ids: Sequence[int] = ()) -> Tensor:
    B, N = t.labels.shape
    draws = random_draws((B, N), t.vocab_size, num_samples, generator, t.labels.device)
    support = torch.zeros(B, N, t.vocab_size, dtype=torch.bool, device=t.labels.device)
    support.scatter_(2, draws, True)                                 # (B, N, V)
    return _with_label(t, _without(exclude_ids, support))


def reverse_subset_mask(t: Targets, *, exclude_ids: Sequence[int] = ()) -> Tensor:
    N = t.labels.shape[1]
    support = (~_row_token_mask(t)).unsqueeze(1).expand(-1, N, -1)  # (B, N, V)
    return _with_label(t, _without(exclude_ids, support))


def selective_eos_mask(t: Targets, *, eos_token_id: int) -> Tensor:
    return _with_label(t, _without([eos_token_id], mle_mask(t)))


def subset_mask(t: Targets, *, include: Optional[Tensor] = None, exclude: Optional[Tensor] = None) -> Tensor:
    B, N = t.labels.shape
    V = t.vocab_size
    device = t.labels.device
    if include is not None:
        ids = include.to(device, torch.long)
        if ids.dim() == 2:                                           # (B, K) per row
            ids = ids.unsqueeze(1).expand(-1, N, -1)
        else:                                                        # (B, N, K) per label position
            ids = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1) if t.shift else ids
        ids = torch.where(ids < 0, V, ids)                           # padding → a spare column
        support = torch.zeros(B, N, V + 1, dtype=torch.bool, device=device)
        support.scatter_(2, ids, True)
        return _with_label(t, support[..., :V].contiguous())
    assert exclude is not None  # validation asks for exactly one of include and exclude
    ids = torch.where(exclude < 0, V, exclude.to(device, torch.long))
    excluded = torch.zeros(B, V + 1, dtype=torch.bool, device=device).scatter_(1, ids, True)[:, :V]
    return _with_label(t, (~excluded).unsqueeze(1).expand(-1, N, -1))


MASKS: dict[str, Callable[..., Tensor]] = {
    "mle": mle_mask,
    "smile": smile_mask,
    "random_subset": random_subset_mask,
    "reverse_subset": reverse_subset_mask,
    "selective_eos": selective_eos_mask,
    "subset": subset_mask,
}


def token_losses(logits: Tensor, t: Targets, support: Tensor, label_smoothing: float) -> Tensor:
    """(B, N) fp32 loss of each position over its support mask (B, N, V); 0 where there is no target."""
    z = logits.float().masked_fill(~support, float("-inf"))          # (B, N, V)
    logp = torch.log_softmax(z, dim=-1)                               # (B, N, V)
    safe = torch.where(t.target_mask, t.labels, 0)
    nll = -logp.gather(2, safe.unsqueeze(-1)).squeeze(-1)             # (B, N)
    if label_smoothing > 0:
        mean_nll = -logp.masked_fill(~support, 0.0).sum(-1) / support.sum(-1)
        nll = (1 - label_smoothing) * nll + label_smoothing * mean_nll
    return torch.where(t.target_mask, nll, torch.zeros_like(nll))


def objective_token_losses(logits: Tensor, labels: Tensor, members: list[tuple[float, str, dict[str, Any]]], *,
                           shift: bool, ignore_index: int, label_smoothing: float) -> Tensor:
    """(B, N) fp32: the weighted sum over ``members`` = [(weight, name, options)] of each member's
    token losses, on logits (B, N, V) and unshifted labels (B, N)."""
    t = targets(labels, logits.shape[-1], shift, ignore_index)
    total = torch.zeros(t.labels.shape, dtype=torch.float32, device=logits.device)
    for weight, name, options in members:
        total = total + weight * token_losses(logits, t, MASKS[name](t, **options), label_smoothing)
    return total
