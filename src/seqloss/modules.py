"""``nn.Module`` wrappers: options checked at construction, one functional call in ``forward``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from . import functional as F
from ._validate import check_options
from ._validate_sampled import check_sampled_options
from .call import LinearOptions, LogitsOptions, Objective, ObjectiveOptions


def _checked(objective: Any, options: dict[str, Any], class_weights_as: str) -> dict[str, Any]:
    """``options`` after the checks a call makes without tensors (a misspelt objective or keyword
    fails here, not at the first forward)."""
    as_checked = dict(options)
    if class_weights_as != "class_weight":
        if "class_weight" in as_checked:
            raise TypeError(f"pass class weights once, as {class_weights_as}=; class_weight= is LinearLoss's")
        if "exact_accumulation" in as_checked:
            raise TypeError("exact_accumulation is LinearLoss's: the losses on logits accumulate nothing")
        as_checked["class_weight"] = as_checked.pop(class_weights_as, None)
    check_options(objective, as_checked)
    return options


class _ObjectiveModule(nn.Module):
    """Holds the keyword options of one objective; ``forward(logits, labels, **per_call)``."""

    objective: Objective = "mle"

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = _checked(self.objective, options, "weight")

    def forward(self, logits: Tensor, labels: Tensor, **per_call: Any) -> F.Loss:
        return F.objective_loss(logits, labels, self.objective, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CrossEntropyLoss(_ObjectiveModule):
    """MLE; see ``seqloss.cross_entropy``."""

    objective = "mle"

    def __init__(self, **common: Unpack[LogitsOptions]) -> None:
        super().__init__(**common)


class SmileLoss(_ObjectiveModule):
    """SMILE; see ``seqloss.smile_loss``."""

    objective = "smile"

    def __init__(self, *, first_token_mle: bool = True, exclude_ids: Sequence[int] = (),
                 **common: Unpack[LogitsOptions]) -> None:
        super().__init__(first_token_mle=first_token_mle, exclude_ids=exclude_ids, **common)


class RandomSubsetLoss(_ObjectiveModule):
    """Random subsetting; see ``seqloss.random_subset_loss``."""

    objective = "random_subset"

    def __init__(self, *, num_samples: int = 10, generator: Optional[torch.Generator] = None,
                 exclude_ids: Sequence[int] = (), **common: Unpack[LogitsOptions]) -> None:
        super().__init__(num_samples=num_samples, generator=generator, exclude_ids=exclude_ids, **common)


class ReverseSubsetLoss(_ObjectiveModule):
    """Reverse subsetting; see ``seqloss.reverse_subset_loss``."""

    objective = "reverse_subset"

    def __init__(self, *, exclude_ids: Sequence[int] = (), **common: Unpack[LogitsOptions]) -> None:
        super().__init__(exclude_ids=exclude_ids, **common)


class SelectiveEOSLoss(_ObjectiveModule):
    """Selective EOS; see ``seqloss.selective_eos_loss``."""

    objective = "selective_eos"

    def __init__(self, eos_token_id: int, **common: Unpack[LogitsOptions]) -> None:
        super().__init__(eos_token_id=eos_token_id, **common)


class SubsetCrossEntropyLoss(_ObjectiveModule):
    """Explicit candidates; pass ``include=`` or ``exclude=`` per call (they change every batch)."""

    objective = "subset"

    def __init__(self, **common: Unpack[LogitsOptions]) -> None:
        super().__init__(**common)

    def forward(self, logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = None,
                exclude: Optional[Tensor] = None, **per_call: Any) -> F.Loss:
        return super().forward(logits, labels, include=include, exclude=exclude, **per_call)


class ObjectiveLoss(_ObjectiveModule):
    """Any objective or mixture by name: ``ObjectiveLoss({"mle": 0.01, "smile": 0.99}, shift=True)``."""

    def __init__(self, objective: Objective = "mle", **options: Unpack[ObjectiveOptions]) -> None:
        self.objective = objective
        super().__init__(**options)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.objective), super().extra_repr()]).rstrip(", ")


class SampledSoftmaxLoss(nn.Module):
    """Sampled softmax; see ``seqloss.sampled_softmax_loss``. ``forward(hidden, weight, labels, **per_call)``
    (``generator=`` per call, say)."""

    def __init__(self, num_negatives: int, **options: Any) -> None:
        super().__init__()
        check_sampled_options(num_negatives, options)
        self.options: dict[str, Any] = {"num_negatives": num_negatives, **options}

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, **per_call: Any) -> Tensor:
        return F.sampled_softmax_loss(hidden, weight, labels, **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearLoss(nn.Module):
    """The fused LM head; see ``seqloss.linear_loss``. ``LinearLoss("smile", shift=True)``, then
    ``forward(hidden, weight, labels, bias=None, **per_call)`` — the head's weight and bias are the
    model's (``lm_head.weight``), passed per call, as Liger's fused-linear loss takes them."""

    def __init__(self, objective: Objective = "mle", **options: Unpack[LinearOptions]) -> None:
        super().__init__()
        self.objective = objective
        self.options = _checked(objective, dict(options), "class_weight")

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None,
                **per_call: Any) -> F.Loss:
        return F.linear_loss(hidden, weight, labels, bias=bias, objective=self.objective,
                             **{**self.options, **per_call})

    def extra_repr(self) -> str:
        return ", ".join([repr(self.objective)] + [f"{k}={v!r}" for k, v in self.options.items()])
