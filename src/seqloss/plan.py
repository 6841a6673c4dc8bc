"""The plan every engine walks: validated labels → shifted targets, support parts, position weights.

A plan holds no objective names: each member of an objective (or mixture) has become one or two
*support parts* — positions that score every id but an exclusion list (a full part), or the label
plus a candidate list (a list part). Engines, torch or Triton, only ever see parts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._validate import Common, Member
from .support import OBJECTIVES, FullSupport, ListSupport, Targets, example_starts, sequences_of, shift_labels


class SupportPart(NamedTuple):
    """One part of a member's support over some positions (B, N): a full part (``ids`` None: every
    id but ``exclude``) or a list part (the label plus ``ids``)."""

    alpha: float
    exclude: Optional[Tensor]
    ids: Optional[Tensor]
    positions: Tensor


@dataclass
class Plan:
    """What an engine needs, built once per call from validated inputs."""

    labels: Tensor            # (B, N) long, 0 where there is no target (safe to gather)
    coef: Tensor              # (B, N) fp32 weight of each position in a scalar output (0 = no target)
    parts: list[SupportPart]  # every member's parts, in order
    label_smoothing: float
    scalar: bool              # output Σ coef·loss (mean / sum) instead of per-position losses
    # (B, N) long: the list of each position in a part's (S, 1, K) ids or exclusions, when
    # sequences are not rows (packed examples, turns); None: the list of row b is ids[b].
    sequence: Optional[Tensor] = None
    z_loss: float = 0.0               # coefficient of lse² per position (rows.py)
    softcap: Optional[float] = None   # cap each logit c·tanh(z / c) as the engine reads or makes it

    def list_of(self, b: Tensor, n: Tensor) -> Tensor:
        """Which of a part's (B or S, 1, K) lists the positions (b, n) use."""
        return b if self.sequence is None else self.sequence[b, n]


def sequence_groups(sequence: Tensor, positions: Tensor, count: int) -> Tensor:
    """(count, M) long: the flat indices of the listed ``positions`` (B, N) of each sequence, in
    order, -1 padded (M = the most in any sequence, ≥ 1). Engines use it to score each sequence's
    positions against its one list, as they score a row's positions against a row's list."""
    flat = positions.reshape(-1).nonzero().squeeze(1)                  # row-major order
    seq = sequence.reshape(-1)[flat]                                   # non-decreasing
    counts = torch.bincount(seq, minlength=count)
    M = max(int(counts.max()), 1) if seq.numel() else 1
    offset = torch.arange(seq.numel(), device=seq.device) - (counts.cumsum(0) - counts)[seq]
    groups = torch.full((count, M), -1, dtype=torch.long, device=positions.device)
    groups[seq, offset] = flat
    return groups


def mostly(positions: Tensor) -> bool:
    """Whether at least half of the positions are set: then streaming every position in order
    (slices, no gathers) beats visiting only the listed ones."""
    return 2 * int(positions.sum()) >= positions.numel()


def position_weights(target_mask: Tensor, c: Common, labels: Optional[Tensor] = None) -> Tensor:
    """(B, N) fp32 weight of each position's loss in a scalar output (mean divides by the count).

    With class weights (and the shifted ``labels``), a position weighs the weight of its label's
    class and the mean divides by their sum, as ``F.cross_entropy(weight=...)`` does (per-position
    outputs are weighted after the engines, by the dispatch)."""
    weights = target_mask.float()
    if c.class_weight is not None and labels is not None and c.reduction in ("mean", "sum"):
        weights = weights * label_weights(labels, target_mask, c.class_weight)
    if c.reduction != "mean":
        return weights
    if c.num_items_in_batch is not None:
        denominator = torch.as_tensor(c.num_items_in_batch, dtype=torch.float32, device=weights.device)
    else:
        total = weights.sum()  # class weights may sum below 1: divide by that sum, as torch does
        denominator = torch.where(total > 0, total, torch.ones_like(total))  # nothing supervised → 0, not NaN
    return weights / denominator


def label_weights(labels: Tensor, target_mask: Tensor, class_weight: Tensor) -> Tensor:
    """(B, N) fp32: the class weight of each position's label (0 where there is no target)."""
    return torch.where(target_mask, class_weight[torch.where(target_mask, labels, 0)], 0.0)


def targets_of(labels: Tensor, c: Common, vocab_size: int) -> Targets:
    """Unshifted labels (B, N) → the shifted targets every support rule reads, with their
    sequences (packed examples from ``c.position_ids`` (B, N), turns)."""
    starts = None if c.position_ids is None else example_starts(c.position_ids)
    shifted = shift_labels(labels.long(), c.shift, c.ignore_index, starts)
    target_mask = shifted != c.ignore_index
    return Targets(shifted, target_mask, vocab_size, c.shift, sequences_of(target_mask, starts, c.turns))


def support_parts(members: list[tuple], target_mask: Tensor) -> list[SupportPart]:
    """[(weight, support)] → parts, in order: the one place that splits SMILE's first tokens (all V
    ids) from its list positions."""
    parts = []
    for alpha, support in members:
        if alpha == 0:
            continue
        if isinstance(support, FullSupport):
            parts.append(SupportPart(alpha, support.exclude, None, target_mask))
            continue
        assert isinstance(support, ListSupport)
        list_positions = target_mask
        if support.full_positions is not None:
            full_positions = support.full_positions & target_mask
            list_positions = target_mask & ~full_positions
            parts.append(SupportPart(alpha, None, None, full_positions))
        parts.append(SupportPart(alpha, None, support.ids, list_positions))
    return parts


def plan_of(targets: Targets, members: list[Member], c: Common) -> Plan:
    """The support rules of the members (random draws happen here) and the position weights."""
    supports = [(w, OBJECTIVES[name].build(targets, **opts)) for w, name, opts in members]
    safe = torch.where(targets.target_mask, targets.labels, 0)
    sequence = None if targets.sequences is None else targets.sequences.index
    coef = position_weights(targets.target_mask, c, targets.labels)
    return Plan(safe, coef, support_parts(supports, targets.target_mask), float(c.label_smoothing),
                scalar=c.reduction in ("mean", "sum"), sequence=sequence, z_loss=float(c.z_loss),
                softcap=None if c.softcap is None else float(c.softcap))
