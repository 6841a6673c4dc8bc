"""The collectives of a vocabulary-parallel loss, in one place (the tests count what passes here).

Every rank of the group holds the same plan (labels, supports, weights are whole and the same on
every rank), so every rank makes the same calls with tensors of the same shapes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


def eager(fn: F) -> F:
    """``fn`` run eagerly even inside a compiled function (a graph break: a process group crosses
    no traced graph), without importing the compiler for eager calls (``torch.compiler.disable``
    as a decorator would, at import)."""
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return call  # type: ignore[return-value]


def all_reduce(x: Tensor, op: Any, group: Any) -> Tensor:
    """``x`` reduced over ``group`` in place (and returned); nothing is sent for an empty tensor (the
    same on every rank, as the plan is)."""
    if x.numel():
        dist.all_reduce(x, op=op, group=group)
    return x


def max_(x: Tensor, group: Any) -> Tensor:
    return all_reduce(x, dist.ReduceOp.MAX, group)


def sum_(x: Tensor, group: Any) -> Tensor:
    return all_reduce(x, dist.ReduceOp.SUM, group)


def min_(x: Tensor, group: Any) -> Tensor:
    return all_reduce(x, dist.ReduceOp.MIN, group)


def check_same(ids: list[Tensor], group: Any, what: str) -> None:
    """Raise unless ``ids`` (integer tensors) are equal on every rank: one all-reduce of two numbers."""
    if not ids:
        return
    flat = torch.cat([t.reshape(-1).long() for t in ids])
    # a fingerprint: the ids' dot product with fixed random 31-bit weights (int64 arithmetic wraps)
    weights = torch.randint(1, 2**31, (flat.numel(),), generator=torch.Generator().manual_seed(20_231_103))
    mixed = ((flat + 1) * weights.to(flat.device)).sum()
    both = torch.stack([mixed, -mixed])
    max_(both, group)
    if int(both[0]) != -int(both[1]):
        raise ValueError(f"{what} differ between the ranks of the vocabulary-parallel group")


class SumGradient(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group — the input of a column-parallel
    head, whose every rank's gradient is a part of the whole."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None]:
        return sum_(grad.contiguous().clone(), ctx.group), None
