"""The checks of ``sampled_softmax_loss`` (its own options besides the common ones), on top of the
shared checks of ``_validate``: same promises, errors that name the argument, value checks in eager
mode only."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor

from ._validate import check_common, check_head, check_labels, is_int, place_tensors, tracing
from .call import BaseOptions, Common, SampledCall

SAMPLER_NAMES = ("uniform", "log_uniform", "in_batch")
# The common keywords sampled softmax takes: those that mean something for a loss without per-row
# sets (packed examples only stop the shift at their ends), the typed BaseOptions.
SAMPLED_COMMON = tuple(BaseOptions.__annotations__)


OWN = ("sampler", "log_q_correction", "remove_accidental_hits", "share_negatives", "generator")


def check_sampled_options(num_negatives: Any, options: Mapping[str, Any]) -> Common:
    """The options of a sampled-softmax call without its tensors (``SampledSoftmaxLoss`` checks them
    when constructed): ``num_negatives``, the common keywords and the sampler's own."""
    unknown = sorted(set(options) - set(SAMPLED_COMMON) - set(OWN))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)} for sampled_softmax_loss; "
                        f"it takes {', '.join(SAMPLED_COMMON + OWN)} besides num_negatives")
    if not is_int(num_negatives):
        raise TypeError(f"num_negatives must be an int, got {type(num_negatives).__name__}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    for name in ("log_q_correction", "remove_accidental_hits", "share_negatives"):
        if name in options and not isinstance(options[name], bool):
            raise TypeError(f"{name} must be a bool, got {type(options[name]).__name__}")
    generator = options.get("generator")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    sampler = options.get("sampler", "uniform")
    if isinstance(sampler, str) and sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler must be one of {SAMPLER_NAMES} or a (V,) tensor of weights, got {sampler!r}")
    return check_common({k: v for k, v in options.items() if k in SAMPLED_COMMON})


def check_sampled_call(hidden: Any, weight: Any, labels: Any, *, num_negatives: Any, sampler: Any,
                       log_q_correction: Any, remove_accidental_hits: Any, share_negatives: Any,
                       generator: Any, options: Mapping[str, Any]) -> SampledCall:
    """The checks of ``sampled_softmax_loss``: the fused head's tensors, the common options and the
    sampler's own (a name, or (V,) non-negative finite weights with a positive sum)."""
    if any(key in OWN for key in options):
        raise TypeError(f"unexpected keyword argument(s) {', '.join(k for k in options if k in OWN)}")
    common = check_sampled_options(num_negatives, {**options, "log_q_correction": log_q_correction,
                                                   "remove_accidental_hits": remove_accidental_hits,
                                                   "share_negatives": share_negatives, "generator": generator})
    check_head(hidden, weight, None)
    *lead_list, N = hidden.shape[:-1]
    lead = tuple(lead_list)
    V = weight.shape[0]
    flat = check_labels(labels, (*lead, N), V, common.ignore_index, hidden.device, against="hidden")
    common = place_tensors(common, flat.shape, tuple(labels.shape), V, hidden.device)
    return SampledCall(common, flat, lead, N, V, int(num_negatives), _check_sampler(sampler, V, hidden.device),
                       log_q_correction, remove_accidental_hits, share_negatives, generator)


def _check_sampler(sampler: Any, V: int, device: torch.device) -> Union[str, Tensor]:
    if isinstance(sampler, str):
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {SAMPLER_NAMES} or a (V,) tensor of weights, got {sampler!r}")
        return sampler
    if not isinstance(sampler, Tensor):
        raise TypeError(f"sampler must be a name or a (V,) tensor of weights, got {type(sampler).__name__}")
    if sampler.is_complex() or sampler.dtype == torch.bool or tuple(sampler.shape) != (V,):
        raise ValueError(f"sampler weights must be a real tensor of shape ({V},) (one per row of weight; "
                         f"item counts are fine), got {sampler.dtype} {tuple(sampler.shape)}")
    if sampler.device.type == "meta":
        raise ValueError(f"sampler is on the meta device (it holds no values); pass it on {device}")
    checked = sampler.to(device=device, dtype=torch.float64)
    if not tracing():
        if not bool(torch.isfinite(checked).all()) or bool((checked < 0).any()):
            raise ValueError("sampler weights must be finite and >= 0")
        if not float(checked.sum()) > 0:
            raise ValueError("sampler weights must have a positive sum")
    return checked
