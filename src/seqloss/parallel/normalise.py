"""One denominator for a whole optimiser step: the supervised tokens (or their weights) of every
micro-batch on every rank, counted the way the losses count them.

With ``reduction="mean"`` each call divides by its own batch's weight sum, so a step over several
micro-batches or ranks with uneven valid-token counts averages averages — not what one process
over all of the data would compute. Count once per step with ``num_items_in_batch`` and pass the
count to every call as ``num_items_in_batch=``: the sum of the calls' losses (over micro-batches and
over the ranks of ``group``) is then the one-process mean, and so are its gradients. DDP and FSDP
*average* gradients over their ranks; multiply each rank's loss by the group's size to undo that,
as Hugging Face's Trainer does with ``average_tokens_across_devices``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .._validate import check_common, check_labels, place_tensors
from ..plan import position_weights
from ..support import targets_of
from . import collectives

Batches = Union[Tensor, Sequence[Tensor]]


def _each(value: Optional[Batches], count: int, name: str) -> list[Optional[Tensor]]:
    if value is None:
        return [None] * count
    if isinstance(value, Tensor):
        value = [value]
    if len(value) != count:
        raise ValueError(f"{name} must come with every micro-batch's labels: {count} labels, {len(value)} {name}")
    return list(value)


def num_items_in_batch(labels: Batches, *, shift: bool = False, ignore_index: int = -100,
                       position_ids: Optional[Batches] = None, token_weights: Optional[Batches] = None,
                       weight: Optional[Tensor] = None, group: Any = None) -> Tensor:
    """The weight sum of the supervised positions of ``labels`` — one tensor (..., N), or a sequence
    of them, the micro-batches of one optimiser step — summed over the ranks of ``group`` when one is
    given (the data-parallel ranks, with the context-parallel ones); an fp32 scalar.

    A position counts as the losses count it: 1 where it has a target after ``shift`` (packed
    examples' ends from ``position_ids`` have none), times its label's class ``weight`` and its
    ``token_weights``. Ranks that share their data (a tensor-parallel group) must not be in ``group``.
    A step whose weight sum is 0 counts 1 (as ``"mean"`` divides by 1 then): its losses are 0.
    """
    batches = [labels] if isinstance(labels, Tensor) else list(labels)
    if not batches:
        raise ValueError("num_items_in_batch needs the labels of at least one micro-batch")
    total: Optional[Tensor] = None
    for batch, ids, weights in zip(batches, _each(position_ids, len(batches), "position_ids"),
                                   _each(token_weights, len(batches), "token_weights")):
        if not isinstance(batch, Tensor) or batch.dim() < 1:
            raise TypeError("labels must be a tensor (..., N) or a sequence of them")
        common = check_common(dict(shift=shift, ignore_index=ignore_index, reduction="sum", position_ids=ids,
                                   token_weights=weights, class_weight=weight))
        vocab = weight.shape[0] if weight is not None else int(batch.max().clamp_min(0)) + 1 if batch.numel() else 1
        flat = check_labels(batch, tuple(batch.shape), vocab, ignore_index, batch.device, "labels")
        common = place_tensors(common, flat.shape, tuple(batch.shape), vocab, batch.device)
        count = position_weights(targets_of(flat, common, vocab), common).sum()
        total = count if total is None else total + count.to(total.device)
    assert total is not None
    if group is not None:
        collectives.sum_(total, group)
    total = total.float()
    return torch.where(total > 0, total, torch.ones_like(total))  # nothing supervised: losses 0, not NaN
