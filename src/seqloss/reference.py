"""The dense spec of every objective, its weighting and reductions: readable, slow, the oracle of every test.

Each objective is a boolean support mask over the vocabulary, built the way the papers and the
SMILE authors' code build it, then one masked log-softmax:

    loss(b, n) = logsumexp_{v in S(b,n)} z[b,n,v] - z[b,n,y]                 (y = label at (b, n))

with label smoothing ε spread over the support:
    (1 - ε) · (-log p_y) + ε · mean_{v in S(b,n)} (-log p_v).

"Per row" means per *sequence*: a row, each packed example of a row (``position_ids``: an example
starts where they restart, at 0), or with ``turns`` each maximal run of supervised positions of an example.

Each position's loss is weighted by 1, its label's class weight and its own token weight, and
reduced as ``reduction`` asks (``reduced``).

This module materialises (B, N, V) masks and masked copies of the logits on purpose; the engines
never do. It builds every mask from the labels alone and imports nothing from the code it checks
(the shift, the sequences, the first supervised position, the weights and the random draws are
written out again here). Inputs are already validated and flattened: logits (B, N, V), labels and
per-position tensors (B, N) unshifted.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    same_sequence: Tensor  # (B, N, N) bool: positions n and m belong to the same sequence


def targets(labels: Tensor, vocab_size: int, shift: bool, ignore_index: int,
            position_ids: Optional[Tensor] = None, turns: bool = False) -> Targets:
    """Position n predicts ``labels[n + 1]`` when ``shift`` (the last position of a row, and of a
    packed example, has no target)."""
    labels = labels.long()
    B, N = labels.shape
    example = torch.zeros(B, N, dtype=torch.long, device=labels.device)  # example number within the row
    if position_ids is not None:  # a new example wherever the positions do not count on (a restart at 0)
        restarts = position_ids[:, 1:] != position_ids[:, :-1] + 1
        example[:, 1:] = restarts.long().cumsum(dim=1)
    if shift:
        next_example = torch.cat([example[:, 1:], example[:, -1:] + 1], dim=1)
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
        labels = torch.where(next_example == example, labels, ignore_index)  # never across two examples
    target_mask = labels != ignore_index
    sequence = example
    if turns:  # a new sequence wherever a run of supervised positions begins
        before = torch.cat([torch.zeros_like(target_mask[:, :1]), target_mask[:, :-1]], dim=1)
        new_example = torch.cat([torch.ones_like(target_mask[:, :1]), example[:, 1:] != example[:, :-1]], dim=1)
        sequence = (new_example | (target_mask & ~before)).long().cumsum(dim=1)
    same_sequence = sequence.unsqueeze(2) == sequence.unsqueeze(1)      # (B, N, N)
    return Targets(labels, target_mask, vocab_size, shift, same_sequence)


def first_supervised(t: Targets) -> Tensor:
    """(B, N) bool: the first position of each sequence with a target."""
    earlier = torch.ones(t.labels.shape[1], t.labels.shape[1], device=t.labels.device).tril(-1).bool()
    supervised_earlier = (t.same_sequence & earlier & t.target_mask.unsqueeze(1)).any(dim=2)  # (B, N)
    return t.target_mask & ~supervised_earlier


def random_draws(shape: tuple[int, int], vocab_size: int, num_samples: int,
                 generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(B, N, num_samples) ids uniform in [0, V) with replacement, drawn on the generator's device
    (CPU without one), as the library promises: the same generator gives the same draws."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(vocab_size, (*shape, num_samples), generator=generator, device=gen_device).to(device)


def _sequence_token_mask(t: Targets) -> Tensor:
    """(B, N, V) bool: the ids that occur as supervised labels in the sequence of each position
    (ignored labels never leak)."""
    one_hot = torch.nn.functional.one_hot(torch.where(t.target_mask, t.labels, t.vocab_size),
                                          t.vocab_size + 1)[..., : t.vocab_size]  # (B, N, V); ignored → none
    return (t.same_sequence.float() @ one_hot.float()) > 0               # (B, N, N) @ (B, N, V)


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
    support = _sequence_token_mask(t)                                # (B, N, V)
    support = _with_label(t, _without(exclude_ids, support))
    if first_token_mle:
        support = support | first_supervised(t).unsqueeze(-1)
    return support


def random_subset_mask(t: Targets, *, num_samples: int = 10, generator: Optional[torch.Generator] = None,
                       exclude_ids: Sequence[int] = ()) -> Tensor:
    B, N = t.labels.shape
    draws = random_draws((B, N), t.vocab_size, num_samples, generator, t.labels.device)
    support = torch.zeros(B, N, t.vocab_size, dtype=torch.bool, device=t.labels.device)
    support.scatter_(2, draws, True)                                 # (B, N, V)
    return _with_label(t, _without(exclude_ids, support))


def reverse_subset_mask(t: Targets, *, exclude_ids: Sequence[int] = ()) -> Tensor:
    support = ~_sequence_token_mask(t)                               # (B, N, V)
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


def capped(logits: Tensor, softcap: Optional[float]) -> Tensor:
    """fp32 logits, soft-capped to c·tanh(z / c) when ``softcap`` = c is given (Gemma 2)."""
    z = logits.float()
    return z if not softcap else softcap * torch.tanh(z / softcap)


def token_losses(logits: Tensor, t: Targets, support: Tensor, label_smoothing: float,
                 softcap: Optional[float] = None, z_loss: float = 0.0) -> tuple[Tensor, Tensor]:
    """(B, N) fp32 loss of each position over its support mask (B, N, V), and its z-loss part
    z_loss · lse² (lse over the support, PaLM's for MLE), which the loss includes; 0 where there is
    no target."""
    z = capped(logits, softcap).masked_fill(~support, float("-inf"))   # (B, N, V)
    logp = torch.log_softmax(z, dim=-1)                               # (B, N, V)
    safe = torch.where(t.target_mask, t.labels, 0)
    nll = -logp.gather(2, safe.unsqueeze(-1)).squeeze(-1)             # (B, N)
    if label_smoothing > 0:
        mean_nll = -logp.masked_fill(~support, 0.0).sum(-1) / support.sum(-1)
        nll = (1 - label_smoothing) * nll + label_smoothing * mean_nll
    z_part = z_loss * torch.logsumexp(z, dim=-1) ** 2 if z_loss else torch.zeros_like(nll)
    zero = torch.zeros_like(nll)
    return torch.where(t.target_mask, nll + z_part, zero), torch.where(t.target_mask, z_part, zero)


def reduced(per_position: Tensor, t: Targets, reduction: str, num_items_in_batch: Any = None,
            class_weight: Optional[Tensor] = None, token_weights: Optional[Tensor] = None) -> Tensor:
    """Per-position values (B, N) → the output: Σ w·value (``"sum"``), that ÷ Σ w or
    ÷ ``num_items_in_batch`` (``"mean"``; 0 when nothing is supervised), or w·value per position
    (``"none"``, ``"sequence"``; the caller sums sequences). w is 1 at each supervised position, times
    its label's class weight and its own token weight (``token_weights`` unshifted, like the labels)."""
    w = t.target_mask.float()                                          # (B, N)
    if class_weight is not None:
        w = w * class_weight.float()[torch.where(t.target_mask, t.labels, 0)]
    if token_weights is not None:
        weights = token_weights.float()
        if t.shift:  # the weight of label n + 1 goes to the position that predicts it
            weights = torch.cat([weights[:, 1:], torch.zeros_like(weights[:, :1])], dim=1)
        w = w * weights
    weighted = w * per_position
    if reduction in ("none", "sequence"):
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, dtype=torch.float32)
    count = w.sum()
    return total / torch.where(count > 0, count, torch.ones_like(count))


def objective_loss(logits: Tensor, labels: Tensor, members: Sequence[tuple[float, str, Mapping[str, Any]]], *,
                   shift: bool = False, ignore_index: int = -100, label_smoothing: float = 0.0,
                   reduction: str = "mean", num_items_in_batch: Any = None,
                   position_ids: Optional[Tensor] = None, turns: bool = False, softcap: Optional[float] = None,
                   z_loss: float = 0.0, class_weight: Optional[Tensor] = None,
                   token_weights: Optional[Tensor] = None, **_: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The loss of ``members`` = [(weight, name, options)] on logits (B, N, V) and unshifted labels
    (B, N), reduced (see ``reduced``), with its z-loss part reduced alike and the argmax of the
    (capped) logits over the whole vocabulary at every supervised position (0 elsewhere)."""
    t = targets(labels, logits.shape[-1], shift, ignore_index, position_ids, turns)
    total = torch.zeros(t.labels.shape, dtype=torch.float32, device=logits.device)
    z_total = torch.zeros_like(total)
    for weight, name, options in members:
        support = MASKS[name](t, **options)
        loss, z_part = token_losses(logits, t, support, label_smoothing, softcap, z_loss)
        total, z_total = total + weight * loss, z_total + weight * z_part
    predicted = torch.where(t.target_mask, capped(logits, softcap).argmax(-1), 0)
    weighting = dict(reduction=reduction, num_items_in_batch=num_items_in_batch, class_weight=class_weight,
                     token_weights=token_weights)
    return reduced(total, t, **weighting), reduced(z_total, t, **weighting), predicted


def sampled_loss(logits: Tensor, labels: Tensor, negatives: Tensor, log_expected: Tensor, *, shift: bool = False,
                 ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                 num_items_in_batch: Any = None, position_ids: Optional[Tensor] = None,
                 token_weights: Optional[Tensor] = None, log_q_correction: bool = True,
                 remove_accidental_hits: bool = True, **_: Any) -> Tensor:
    """Sampled softmax on the full logits (B, N, V) for given draws, reduced as ``reduced``:
    ``negatives`` (K,) shared or (B·N, K) one set per position, ``log_expected`` = log(K·q) of each.

    The support of a position is its label once, with its logit as it is (it is always there, never
    sampled), plus each drawn id as often as it was drawn, its logit lowered by log(K·q) with
    ``log_q_correction``, and no draw of the label itself with ``remove_accidental_hits``:

        loss = log( exp(z_y) + Σ_v c_v · exp(z_v - log(K q_v)) ) - z_y        (c_v = draws of v)
    """
    t = targets(labels, logits.shape[-1], shift, ignore_index, position_ids)
    B, N, V = logits.shape
    z = logits.float().reshape(B * N, V)                               # (M, V)
    y = torch.where(t.target_mask, t.labels, 0).reshape(-1)            # (M,)
    M = z.shape[0]
    ids = negatives.expand(M, -1) if negatives.dim() == 1 else negatives            # (M, K)
    lowering = log_expected.expand(M, -1) if log_expected.dim() == 1 else log_expected
    counts = torch.zeros(M, V, device=z.device).scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    if remove_accidental_hits:
        counts[torch.arange(M), y] = 0.0
    z_neg = z                                                           # (M, V)
    if log_q_correction:
        z_neg = z - torch.zeros(M, V, device=z.device).scatter_(1, ids, lowering.float())
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)                        # (M,)
    lse = torch.logsumexp(torch.cat([z_y.unsqueeze(1), z_neg + counts.log()], dim=1), dim=1)
    nll = lse - z_y
    if label_smoothing > 0:  # the mean over the support counts each draw
        mean_nll = (nll + (counts * (lse.unsqueeze(1) - z_neg)).sum(1)) / (1 + counts.sum(1))
        nll = (1 - label_smoothing) * nll + label_smoothing * mean_nll
    per_position = torch.where(t.target_mask, nll.view(B, N), 0.0)
    return reduced(per_position, t, reduction, num_items_in_batch, token_weights=token_weights)
