"""The checks of ``sampled_softmax_loss`` (its own options besides the common ones), on top of the
shared checks of ``_validate``: same promises, errors that name the argument, value checks in eager
mode only."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ._validate import Common, check_common, check_labels, check_linear, is_int, tracing

SAMPLER_NAMES = ("uniform", "log_uniform", "in_batch")
# The common keywords sampled softmax takes (packing and turns change nothing for a loss without
# per-row sets, except the shift across packed examples, which it does not implement).
SAMPLED_COMMON = ("shift", "ignore_index", "label_smoothing", "reduction", "num_items_in_batch", "impl")


@dataclass(frozen=True)
class SampledCall:
    """A validated ``sampled_softmax_loss`` call; labels (B, N) on the hidden states' device."""

    common: Common
    labels: Tensor
    lead: tuple[int, ...]
    N: int
    vocab_size: int
    num_negatives: int
    sampler: Union[str, Tensor]   # a name, or (V,) float64 weights on the hidden states' device
    log_q_correction: bool
    remove_accidental_hits: bool
    share_negatives: bool
    generator: Optional[torch.Generator]


def check_sampled_call(hidden: Any, weight: Any, labels: Any, *, num_negatives: Any, sampler: Any,
                       log_q_correction: Any, remove_accidental_hits: Any, share_negatives: Any,
                       generator: Any, options: Mapping[str, Any]) -> SampledCall:
    """The checks of ``sampled_softmax_loss``: the fused head's tensors, the common options and the
    sampler's own (a name, or (V,) non-negative finite weights with a positive sum)."""
    unknown = sorted(set(options) - set(SAMPLED_COMMON))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)} for sampled_softmax_loss; "
                        f"it takes {', '.join(SAMPLED_COMMON)} besides its own")
    common = check_common(options)
    check_linear(hidden, weight, None)
    *lead_list, N = hidden.shape[:-1]
    lead = tuple(lead_list)
    V = weight.shape[0]
    check_labels(labels, (*lead, N), V, common.ignore_index, against="hidden")
    if not is_int(num_negatives):
        raise TypeError(f"num_negatives must be an int, got {type(num_negatives).__name__}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    for name, value in (("log_q_correction", log_q_correction), ("remove_accidental_hits", remove_accidental_hits),
                        ("share_negatives", share_negatives)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    checked_sampler: Union[str, Tensor]
    if isinstance(sampler, str):
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES} or a (V,) tensor of weights, got {sampler!r}")
        checked_sampler = sampler
    elif isinstance(sampler, Tensor):
        if sampler.is_complex() or sampler.dtype == torch.bool or tuple(sampler.shape) != (V,):
            raise ValueError(f"sampler weights must be a real tensor of shape ({V},) (one per row of weight; "
                             f"item counts are fine), got {sampler.dtype} {tuple(sampler.shape)}")
        checked_sampler = sampler.to(device=hidden.device, dtype=torch.float64)
        if not tracing():
            if not bool(torch.isfinite(checked_sampler).all()) or bool((checked_sampler < 0).any()):
                raise ValueError("sampler weights must be finite and >= 0")
            if not float(checked_sampler.sum()) > 0:
                raise ValueError("sampler weights must have a positive sum")
    else:
        raise TypeError(f"sampler must be a name or a (V,) tensor of weights, got {type(sampler).__name__}")
    flat = labels.to(hidden.device).reshape(math.prod(lead), N)
    return SampledCall(common, flat, lead, N, V, int(num_negatives), checked_sampler, log_q_correction,
                       remove_accidental_hits, share_negatives, generator)
