"""Context parallelism: each rank scores some positions of every sequence; the whole is one sum.

Every rank builds the plan from the whole labels (so SMILE's and reverse subsetting's row sets, the
first supervised position, packed examples, turns and the ``"mean"`` denominator are the whole
sequences'), and scores only its positions (``Plan.at``) with the ordinary engines. What is left
is the reduction over the group: one all-reduce of the scalar loss (or of the per-row or
per-example sums for ``"sequence"``); ``"none"`` returns this rank's positions as they are. The
all-reduce passes the gradient straight through, so each rank's gradient is its positions' part
of the whole gradient.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..call import Call
from ..support import example_starts
from . import collectives


class SumOverGroup(torch.autograd.Function):
    """Forward: the sum over the group of every rank's part. Backward: the gradient as it comes (each
    rank's part enters the sum once)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        return collectives.sum_(x.detach().clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None]:
        return grad, None


@collectives.eager
def reduce(out: Tensor, call: Call) -> Tensor:
    """This rank's loss (a scalar, or (B, N_local) weighted per position) → the caller's output."""
    context = call.common.context_parallel
    assert context is not None
    reduction = call.common.reduction
    if reduction == "none":
        return out.reshape(*call.lead, context.positions.numel())
    if reduction != "sequence":
        return SumOverGroup.apply(out, context.group)
    position_ids = call.common.position_ids
    if position_ids is None:
        return SumOverGroup.apply(out.sum(-1), context.group).reshape(call.lead)
    starts = example_starts(position_ids)                               # whole (B, N)
    example = (starts.reshape(-1).long().cumsum(0) - 1).view_as(starts)[:, context.positions]
    sums = out.new_zeros(int(starts.sum())).index_add(0, example.reshape(-1), out.reshape(-1))
    return SumOverGroup.apply(sums, context.group)
