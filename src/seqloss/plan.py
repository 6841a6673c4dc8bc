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
from .support import OBJECTIVES, FullSupport, ListSupport, Targets, shift_labels


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


def mostly(positions: Tensor) -> bool:
    """Whether at least half of the positions are set: then streaming every position in order
    (slices, no gathers) beats visiting only the listed ones."""
    return 2 * int(positions.sum()) >= positions.numel()


def position_weights(target_mask: Tensor, c: Common) -> Tensor:
    """(B, N) fp32 weight of each position's loss in a scalar output (mean divides by the count)."""
    weights = target_mask.float()
    if c.reduction != "mean":
        return weights
    if c.num_items_in_batch is not None:
        denominator = torch.as_tensor(c.num_items_in_batch, dtype=torch.float32, device=weights.device)
    else:
        denominator = weights.sum().clamp_min(1.0)  # nothing supervised → 0, not NaN
    return weights / denominator


def targets_of(labels: Tensor, c: Common, vocab_size: int) -> Targets:
    """Unshifted labels (B, N) → the shifted targets every support rule reads."""
    shifted = shift_labels(labels.long(), c.shift, c.ignore_index)
    return Targets(shifted, shifted != c.ignore_index, vocab_size, c.shift)


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
    return Plan(safe, position_weights(targets.target_mask, c), support_parts(supports, targets.target_mask),
                float(c.label_smoothing), scalar=c.reduction in ("mean", "sum"))
