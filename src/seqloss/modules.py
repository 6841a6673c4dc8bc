"""``nn.Module`` wrappers: options at construction, one functional call in ``forward``."""
from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from . import functional as F


class _ObjectiveModule(nn.Module):
    """Holds the keyword options of one objective; ``forward(logits, labels, **per_call)``."""

    objective: Any = None

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def forward(self, logits: Tensor, labels: Tensor, **per_call: Any) -> F.Loss:
        return F.objective_loss(logits, labels, self.objective, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CrossEntropyLoss(_ObjectiveModule):
    """MLE; see :func:`seqloss.cross_entropy`."""

    objective = "mle"


class SmileLoss(_ObjectiveModule):
    """SMILE; see :func:`seqloss.smile_loss`."""

    objective = "smile"


class RandomSubsetLoss(_ObjectiveModule):
    """Random subsetting; see :func:`seqloss.random_subset_loss`."""

    objective = "random_subset"


class ReverseSubsetLoss(_ObjectiveModule):
    """Reverse subsetting; see :func:`seqloss.reverse_subset_loss`."""

    objective = "reverse_subset"


class SelectiveEOSLoss(_ObjectiveModule):
    """Selective EOS; see :func:`seqloss.selective_eos_loss`."""

    objective = "selective_eos"

    def __init__(self, eos_token_id: int, **options: Any) -> None:
        super().__init__(eos_token_id=eos_token_id, **options)


class SubsetCrossEntropyLoss(_ObjectiveModule):
    """Explicit candidates; pass ``include=`` or ``exclude=`` per call (they change every batch)."""

    objective = "subset"

    def forward(self, logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = None,
                exclude: Optional[Tensor] = None, **per_call: Any) -> F.Loss:
        return super().forward(logits, labels, include=include, exclude=exclude, **per_call)


class ObjectiveLoss(_ObjectiveModule):
    """Any objective or mixture by name: ``ObjectiveLoss({"mle": 0.01, "smile": 0.99}, shift=True)``."""

    def __init__(self, objective: Any = "mle", **options: Any) -> None:
        super().__init__(**options)
        self.objective = objective

    def extra_repr(self) -> str:
        return ", ".join([repr(self.objective), super().extra_repr()]).rstrip(", ")


class SampledSoftmaxLoss(nn.Module):
    """Sampled softmax; see :func:`seqloss.sampled_softmax_loss`. ``forward(hidden, weight, labels, **per_call)``
    (``generator=`` per call, say)."""

    def __init__(self, num_negatives: int, **options: Any) -> None:
        super().__init__()
        self.options = {"num_negatives": num_negatives, **options}

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, **per_call: Any) -> Tensor:
        return F.sampled_softmax_loss(hidden, weight, labels, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearLoss(nn.Module):
    """The fused LM head; see :func:`seqloss.linear_loss`. ``LinearLoss("smile", shift=True)``, then
    ``forward(hidden, weight, labels, bias=None, **per_call)`` — the head's weight and bias are the
    model's (``lm_head.weight``), passed per call, as Liger's fused-linear loss takes them."""

    def __init__(self, objective: Any = "mle", **options: Any) -> None:
        super().__init__()
        self.objective = objective
        self.options = options

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                **per_call: Any) -> F.Loss:
        return F.linear_loss(hidden, weight, labels, bias=bias, objective=self.objective,
                             **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join([repr(self.objective)] + [f"{k}={v!r}" for k, v in self.options.items()])
