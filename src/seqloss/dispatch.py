"""The one dispatch point: ``impl`` → what runs, for the logits path and the fused head.

``TABLE`` maps (path, impl) for path in {"logits", "linear"} and impl in {"reference", "torch",
"triton"} to a runner; ``"auto"`` resolves to one of them here and nowhere else. An impl asked for
by name that cannot run raises; nothing falls back silently.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import kernels, reference
from ._validate import Call
from .autograd import compute_dtype, linear_op, logits_op
from .plan import Plan, plan_of, position_weights, targets_of
from .torch_linear import linear_forward
from .torch_logits import logits_forward


def _reference(logits: Tensor, call: Call) -> Tensor:
    """The dense spec, reduced like the engines (per-position losses, or Σ weight·loss)."""
    c = call.common
    assert call.labels is not None
    tok = reference.objective_token_losses(logits, call.labels, call.members, shift=c.shift,
                                           ignore_index=c.ignore_index, label_smoothing=c.label_smoothing)
    if c.reduction not in ("mean", "sum"):
        return tok
    target_mask = reference.targets(call.labels, logits.shape[-1], c.shift, c.ignore_index).target_mask
    return (tok * position_weights(target_mask, c)).sum()


def _reference_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: Call) -> Tensor:
    """The dense spec on ``F.linear`` logits, in the fused head's compute dtype."""
    dtype = compute_dtype(hidden, weight, bias)
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return _reference(logits, call)


def _plan(call: Call) -> Plan:
    assert call.labels is not None and call.vocab_size is not None
    return plan_of(targets_of(call.labels, call.common, call.vocab_size), call.members, call.common)


# The Triton engines are looked up at call time: importing them imports Triton.
_logits_torch = logits_op("torch", lambda: logits_forward)
_logits_triton = logits_op("triton", lambda: kernels.logits_engine())
_linear_torch = linear_op("torch", lambda: linear_forward)
_linear_triton = linear_op("triton", lambda: kernels.linear_engine())

Runner = Callable[..., Tensor]

# (path, impl) → runner(tensors..., call). Logits: runner(logits (B, N, V), call); fused head:
# runner(hidden (B, N, H), weight (V, H), bias (V,) | None, call). Each returns the engine output
# (a scalar Σ coef·loss for mean/sum, else per-position losses (B, N)).
TABLE: dict[tuple[str, str], Runner] = {
    ("logits", "reference"): _reference,
    ("logits", "torch"): lambda logits, call: _logits_torch(logits, _plan(call)),
    ("logits", "triton"): lambda logits, call: _logits_triton(logits, _plan(call)),
    ("linear", "reference"): _reference_linear,
    ("linear", "torch"): lambda h, w, b, call: _linear_torch(h, w, b, _plan(call)),
    ("linear", "triton"): lambda h, w, b, call: _linear_triton(h, w, b, _plan(call)),
}


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"auto"`` → a concrete impl; a named impl that cannot run here raises.

    ``"auto"`` is ``"torch"``: nothing picks the Triton kernels unless asked for by name. They are
    verified against the dense spec (interpreter, sm_90 compile, an H200) and timed once on an H200
    (benchmarks/RESULTS.md), where for MLE they still trail Cut Cross-Entropy; choosing them for
    "auto" on CUDA waits for that gap and a second timing.
    """
    if impl == "triton":
        reason: Optional[str] = kernels.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run: {reason}; use impl='torch' or impl='auto'")
    return "torch" if impl == "auto" else impl


def _finish(out: Tensor, call: Call) -> Tensor:
    """Engine output → the caller's shape: scalar, (..., N) for "none", (...) for "sequence"."""
    reduction = call.common.reduction
    if reduction == "none":
        return out.reshape(*call.lead, call.N)
    return out.sum(-1).reshape(call.lead) if reduction == "sequence" else out


def logits_loss(logits: Tensor, call: Call) -> Tensor:
    """logits (..., N, V) of a validated call → the reduced loss."""
    V = logits.shape[-1]
    impl = resolve_impl(call.common.impl, logits.device)
    out = TABLE["logits", impl](logits.reshape(-1, call.N, V), call)
    return _finish(out, call)


def linear_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: Call) -> Tensor:
    """hidden (..., N, H) and the head of a validated call → the reduced loss."""
    H = hidden.shape[-1]
    impl = resolve_impl(call.common.impl, hidden.device)
    out = TABLE["linear", impl](hidden.reshape(-1, call.N, H), weight, bias, call)
    return _finish(out, call)
