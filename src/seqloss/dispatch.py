"""The one dispatch point: ``impl`` → what runs, for the logits path and the fused head.

``TABLE`` maps (path, impl) for path in {"logits", "linear"} and impl in {"reference", "torch",
"triton"} to a runner; ``"auto"`` resolves to one of them here and nowhere else. An impl asked for
by name that cannot run raises; nothing falls back silently.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import kernels, reference
from ._validate import Call
from ._validate_sampled import SampledCall
from .autograd import compute_dtype, linear_op, logits_op
from .plan import Plan, label_weights, plan_of, position_weights, targets_of
from .sampling import Negatives, draw_negatives
from .support import example_starts, shift_labels
from .torch_linear import linear_forward
from .torch_logits import logits_forward
from .torch_sampled import sampled_op, sampled_token_losses


def _reference(logits: Tensor, call: Call) -> Tensor:
    """The dense spec, reduced like the engines (per-position losses, or Σ weight·loss)."""
    c = call.common
    assert call.labels is not None
    tok = reference.objective_token_losses(logits, call.labels, call.members, shift=c.shift,
                                           ignore_index=c.ignore_index, label_smoothing=c.label_smoothing,
                                           position_ids=c.position_ids, turns=c.turns, softcap=c.softcap,
                                           z_loss=c.z_loss)
    if c.reduction not in ("mean", "sum"):
        return tok
    t = reference.targets(call.labels, logits.shape[-1], c.shift, c.ignore_index, c.position_ids)
    return (tok * position_weights(t.target_mask, c, t.labels)).sum()


def _reference_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: Call) -> Tensor:
    """The dense spec on ``F.linear`` logits, in the fused head's compute dtype."""
    dtype = compute_dtype(hidden, weight, bias)
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return _reference(logits, call)


def _plan(call: Call) -> Plan:
    assert call.labels is not None and call.vocab_size is not None
    return plan_of(targets_of(call.labels, call.common, call.vocab_size), call.members, call.common)


def _sampled_targets(call: SampledCall) -> tuple[Tensor, Tensor]:
    """The shifted labels (B, N), 0 off target (safe to gather), and the target mask (B, N)."""
    labels = shift_labels(call.labels.long(), call.common.shift, call.common.ignore_index)
    target_mask = labels != call.common.ignore_index
    return torch.where(target_mask, labels, 0), target_mask


def _supervised_negatives(negatives: Negatives, target_mask: Tensor) -> Negatives:
    """Per-position draws (B·N, K) → those of the supervised positions (T, K); shared ones as they are."""
    if negatives.ids.dim() == 1:
        return negatives
    keep = target_mask.reshape(-1)
    return Negatives(negatives.ids[keep], negatives.log_expected[keep])


def _reference_sampled(hidden: Tensor, weight: Tensor, negatives: Negatives, call: SampledCall) -> Tensor:
    """The dense sampled-softmax formula on the full logits (B, N, V), per position (B, N)."""
    c = call.common
    logits = torch.nn.functional.linear(hidden.float(), weight.float())
    drawn = _supervised_negatives(negatives, _sampled_targets(call)[1])
    return reference.sampled_token_losses(logits, call.labels, drawn.ids, drawn.log_expected, shift=c.shift,
                                          ignore_index=c.ignore_index, label_smoothing=c.label_smoothing,
                                          log_q_correction=call.log_q_correction,
                                          remove_accidental_hits=call.remove_accidental_hits)


def _torch_sampled(hidden: Tensor, weight: Tensor, negatives: Negatives, call: SampledCall) -> Tensor:
    """The gathered-rows engine on the supervised positions, scattered back to (B, N)."""
    labels, target_mask = _sampled_targets(call)
    losses = sampled_token_losses(hidden[target_mask], weight, labels[target_mask],
                                  _supervised_negatives(negatives, target_mask),
                                  label_smoothing=call.common.label_smoothing,
                                  log_q_correction=call.log_q_correction,
                                  remove_accidental_hits=call.remove_accidental_hits)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    return out.masked_scatter(target_mask, losses)


def _no_sampled_kernel(hidden: Tensor, weight: Tensor, negatives: Negatives, call: SampledCall) -> Tensor:
    raise ValueError("impl='triton' cannot run sampled_softmax_loss: it has no Triton kernel (its scores are "
                     "(T, K), one small matmul); use impl='torch' or impl='auto'")


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
    # Sampled softmax: runner(hidden (B, N, H), weight (V, H), negatives, call) → per-position losses (B, N).
    ("sampled", "reference"): _reference_sampled,
    ("sampled", "torch"): _torch_sampled,
    ("sampled", "triton"): _no_sampled_kernel,
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


def _shifted_labels(call: Call) -> tuple[Tensor, Tensor]:
    """The labels (B, N) aligned with the positions that predict them, and their target mask."""
    c = call.common
    assert call.labels is not None
    starts = None if c.position_ids is None else example_starts(c.position_ids)
    labels = shift_labels(call.labels.long(), c.shift, c.ignore_index, starts)
    return labels, labels != c.ignore_index


def _finish(out: Tensor, call: Call) -> Tensor:
    """Engine output → the caller's shape: scalar, (..., N) for "none", (...) for "sequence" — or,
    with ``position_ids``, (E,): one sum per packed example, in row-major order. Per-position
    outputs carry their label's class weight, as ``F.cross_entropy(weight=..., reduction="none")``."""
    reduction = call.common.reduction
    if reduction in ("none", "sequence") and call.common.class_weight is not None:
        out = out * label_weights(*_shifted_labels(call), call.common.class_weight)
    if reduction == "none":
        return out.reshape(*call.lead, call.N)
    if reduction != "sequence":
        return out
    position_ids = call.common.position_ids
    if position_ids is None:
        return out.sum(-1).reshape(call.lead)
    starts = example_starts(position_ids).reshape(-1)
    example = starts.long().cumsum(0) - 1
    return out.new_zeros(int(starts.sum())).index_add(0, example, out.reshape(-1))


@dataclass
class LossStats:
    """What ``return_stats=True`` returns besides the loss (Liger's and Cut Cross-Entropy's extras)."""

    loss: Tensor            # the reduced loss, exactly as without return_stats (differentiable)
    z_loss: Tensor          # the z-loss part of ``loss`` (detached; 0 without z_loss)
    token_accuracy: Tensor  # fp32 scalar: share of supervised positions whose argmax is the label (0 if none)
    predicted_ids: Tensor   # (..., N) long: the argmax over the whole vocabulary at every position


def _generator_states(call: Call) -> list[tuple[torch.Generator, Tensor]]:
    """The random generators a call draws from (random_subset), with their states now."""
    generators = [o["generator"] for _, _, o in call.members if o.get("generator") is not None]
    if any("num_samples" in o and o.get("generator") is None for _, _, o in call.members):
        generators.append(torch.default_generator)
    return [(g, g.get_state()) for g in generators]


def _stats(run: Callable[[Call], Tensor], call: Call, predicted: Tensor) -> LossStats:
    """The loss of ``run(call)`` with its z-loss part (the same call without z-loss, on the same
    random draws, under no_grad) and the accuracy of ``predicted`` (B, N) ids."""
    before = _generator_states(call) if call.common.z_loss else []
    loss = run(call)
    z_part = torch.zeros((), dtype=torch.float32, device=predicted.device)
    if call.common.z_loss:
        after = [(g, g.get_state()) for g, _ in before]
        for g, state in before:
            g.set_state(state)
        with torch.no_grad():
            plain = run(dataclasses.replace(call, common=dataclasses.replace(call.common, z_loss=0.0)))
        for g, state in after:
            g.set_state(state)
        z_part = (loss.detach() - plain).sum() if loss.dim() == 0 else loss.detach() - plain
    labels, target_mask = _shifted_labels(call)
    hits = ((predicted == labels) & target_mask).sum()
    accuracy = (hits / target_mask.sum().clamp_min(1)).float()
    return LossStats(loss, z_part, accuracy, predicted.reshape(*call.lead, call.N))


def logits_loss(logits: Tensor, call: Call) -> Union[Tensor, LossStats]:
    """logits (..., N, V) of a validated call → the reduced loss (or, with ``return_stats``, LossStats)."""
    if not call.common.return_stats:
        return _logits_loss(logits, call)
    with torch.no_grad():  # the soft-cap is monotonic: it never changes the argmax
        predicted = logits.reshape(-1, call.N, logits.shape[-1]).argmax(-1)
    return _stats(lambda c: _logits_loss(logits, c), call, predicted)


def linear_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: Call) -> Union[Tensor, LossStats]:
    """hidden (..., N, H) and the head of a validated call → the reduced loss (or LossStats)."""
    if not call.common.return_stats:
        return _linear_loss(hidden, weight, bias, call)
    return _stats(lambda c: _linear_loss(hidden, weight, bias, c), call, _fused_argmax(hidden, weight, bias, call))


# Positions per chunk of the fused head's argmax (return_stats): about this many logits at a time.
ARGMAX_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def _fused_argmax(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: Call) -> Tensor:
    """(B, N) argmax of ``hidden @ weight.T + bias`` over the vocabulary, chunk by chunk (one more
    pass of the head, without gradients: the cost of ``return_stats`` on the fused path)."""
    dtype = compute_dtype(hidden, weight, bias)
    rows = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
    chunk = max(1, ARGMAX_CHUNK_ELEMENTS // weight.shape[0])
    out = [torch.nn.functional.linear(rows[i:i + chunk], w, b).argmax(-1) for i in range(0, rows.shape[0], chunk)]
    flat = torch.cat(out) if out else rows.new_zeros(0, dtype=torch.long)
    return flat.reshape(-1, call.N)


def _logits_loss(logits: Tensor, call: Call) -> Tensor:
    """logits (..., N, V) of a validated call → the reduced loss."""
    V = logits.shape[-1]
    impl = resolve_impl(call.common.impl, logits.device)
    out = TABLE["logits", impl](logits.reshape(-1, call.N, V), call)
    return _finish(out, call)


def _linear_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: Call) -> Tensor:
    """hidden (..., N, H) and the head of a validated call → the reduced loss."""
    H = hidden.shape[-1]
    impl = resolve_impl(call.common.impl, hidden.device)
    out = TABLE["linear", impl](hidden.reshape(-1, call.N, H), weight, bias, call)
    return _finish(out, call)


def sampled_loss(hidden: Tensor, weight: Tensor, call: SampledCall) -> Tensor:
    """hidden (..., N, H) and the head of a validated sampled-softmax call → the reduced loss.

    The negatives are drawn here, once, before the branch: every impl scores the same draws. Under
    torch.compile the torch engine runs as a custom op over all positions (static shapes)."""
    c = call.common
    impl = "torch" if c.impl == "auto" else c.impl
    labels, target_mask = _sampled_targets(call)
    negatives = draw_negatives(call.sampler, call.num_negatives, call.vocab_size, labels.reshape(-1),
                               target_mask.reshape(-1), not call.share_negatives, call.generator)
    if negatives.ids.device != weight.device:
        negatives = Negatives(negatives.ids.to(weight.device), negatives.log_expected.to(weight.device))
    H = hidden.shape[-1]
    if torch.compiler.is_compiling() and impl == "torch":
        lowering = negatives.log_expected if call.log_q_correction else None
        per_position = sampled_op(hidden.reshape(-1, H), weight, labels.reshape(-1), target_mask.reshape(-1),
                                  negatives.ids, lowering, float(c.label_smoothing),
                                  call.remove_accidental_hits).view(labels.shape)
    else:
        per_position = TABLE["sampled", impl](hidden.reshape(-1, call.N, H), weight, negatives, call)
    if c.reduction in ("mean", "sum"):
        out = (per_position * position_weights(target_mask, c)).sum()
    else:
        out = per_position
    if c.reduction == "none":
        return out.reshape(*call.lead, call.N)
    return out.sum(-1).reshape(call.lead) if c.reduction == "sequence" else out
