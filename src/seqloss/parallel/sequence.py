"""Context parallelism: each rank scores some positions of every sequence; the whole is one sum.

Every rank builds the plan from the whole labels (so SMILE's and reverse subsetting's row sets, the
first supervised position, packed examples, turns and the ``"mean"`` denominator are the whole
sequences'), and scores only its positions (``Plan.at``) with the ordinary engines. What is left
is the sum over the group (``dispatch.finish``): one all-reduce of the scalar loss (or of the
per-row or per-example sums for ``"sequence"``); ``"none"`` returns this rank's positions as they are. The
all-reduce passes the gradient straight through, so each rank's gradient is its positions' part
of the whole gradient.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

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
def sum_over_group(x: Tensor, group: Any) -> Tensor:
    """Every rank's part summed over ``group``; the gradient passes through to each part."""
    return SumOverGroup.apply(x, group)
