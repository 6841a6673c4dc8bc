"""Value checks of single keywords, below the call checks of ``_validate``: numbers, the softmax
options, ``num_items_in_batch``, and whether torch.compile is tracing (then checks that read tensor
values are skipped)."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .call import SoftmaxOptions


def tracing() -> bool:
    """True while torch.compile traces: data-dependent checks are skipped (see the module docstring)."""
    return torch.compiler.is_compiling()


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_softmax(options: Mapping[str, Any], weighted: bool = False) -> SoftmaxOptions:
    """The options the per-position math reads, from a call's keywords; ``weighted``: the call has
    class weights, which do not go with label smoothing."""
    label_smoothing = options.get("label_smoothing", 0.0)
    z_loss, softcap = options.get("z_loss", 0.0), options.get("softcap")
    if not is_real(label_smoothing):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if not is_real(z_loss):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"z_loss must be a finite coefficient >= 0, got {z_loss}")
    if softcap is not None:
        if not is_real(softcap):
            raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be a positive finite number, got {softcap}")
    if weighted and label_smoothing > 0:
        raise ValueError("class weights with label_smoothing > 0 are not supported (torch weights the "
                         "smoothing term per class, over the whole vocabulary, which subsets do not have)")
    return SoftmaxOptions(float(label_smoothing), float(z_loss), 0.0 if softcap is None else float(softcap))


def check_num_items(k: Any) -> Any:
    if k is None:
        return None
    if isinstance(k, Tensor):
        if k.numel() != 1:
            raise ValueError("num_items_in_batch must be a single positive number")
        if tracing():
            return k
        if k.is_floating_point() and not torch.isfinite(k).all():
            raise ValueError("num_items_in_batch must be a single positive number")
        value = k.item()
    elif is_real(k):
        value = k
    else:
        raise TypeError(f"num_items_in_batch must be an int or a tensor, got {type(k).__name__}")
    if not value > 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {value}")
    return k
