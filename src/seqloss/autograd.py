"""The two differentiable operations: support cross-entropy on logits, and through the fused head.

Each exists twice around the same engine calls (``torch_logits.py``, ``torch_linear.py``,
``kernels/``), which run on real tensors with data-dependent loops:

* in eager mode, an ``autograd.Function`` (:class:`SupportCrossEntropy`,
  :class:`LinearSupportCrossEntropy`): no tracing machinery is imported or run;
* under ``torch.compile``, a ``torch.library`` custom op with a fake implementation and registered
  autograd, so that Dynamo sees one opaque op of known output shapes and
  ``torch.compile(fullgraph=True)`` traces a loss call as support building plus that op.
  (A custom op cannot serve eager calls too: its first call imports the compiler stack, ~2 s and
  ~150 MB.)

Logits path: forward makes the gradient of Σ coef·loss with respect to the logits in the same pass;
backward only scales that buffer, in place (it is ours, and handed over as ``.grad`` without a copy).
Fused head: scalar outputs (mean / sum) get their fp32 gradients in forward, which backward scales;
per-position outputs learn their weights only in backward, which recomputes.

Engines run with autocast disabled: their math is fp32 by design, and an autocast-chosen matmul
dtype would clash with their fp32 accumulators. The fused head casts hidden, weight and bias to one
compute dtype inside the operation (autocast's dtype under autocast, as ``F.linear`` would; else the
widest of the three) and returns each gradient in its own input's dtype from the fp32 accumulators.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._buffers import Grads
from .plan import Plan, SupportPart

# The custom ops' signatures use typing.List/Tuple: torch.library infers their schemas from the
# annotations at run time, and torch 2.4 knows only the typing forms.

LogitsEngine = Callable[[Tensor, Plan, bool], tuple[Tensor, Optional[Tensor]]]
LinearEngine = Callable[..., tuple[Tensor, Grads]]
SECOND_BACKWARD = ("seqloss: backward ran twice through the same loss; its gradient buffers are consumed by the "
                   "first backward (recompute the loss instead of retain_graph=True)")


def _flat_parts(plan: Plan) -> tuple[list[float], list[Optional[Tensor]], list[Optional[Tensor]], list[Tensor]]:
    """The plan's parts as the four lists a custom op can take."""
    return ([float(p.alpha) for p in plan.parts], [p.exclude for p in plan.parts], [p.ids for p in plan.parts],
            [p.positions for p in plan.parts])


def _plan(labels: Tensor, coef: Tensor, alphas: Sequence[float], excludes: Sequence[Optional[Tensor]],
          ids: Sequence[Optional[Tensor]], positions: Sequence[Tensor], label_smoothing: float,
          scalar: bool, sequence: Optional[Tensor], z_loss: float, softcap: Optional[float]) -> Plan:
    parts = [SupportPart(*part) for part in zip(alphas, excludes, ids, positions)]
    return Plan(labels, coef, parts, label_smoothing, scalar, sequence, z_loss, softcap)


def _no_grads(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """None for every input, in the structure ``register_autograd`` expects back: a list of
    tensors (no None in it) wants a list of Nones, anything else one None."""
    return tuple([None] * len(x) if isinstance(x, list) and all(isinstance(v, Tensor) for v in x) else None
                 for x in inputs)


def _scaled(grad_out: Tensor, traced: bool) -> bool:
    """Whether a scalar loss's gradient must be scaled: in eager, not by 1 (the usual ``loss.backward()``,
    which would cost a pass over the buffer); in a traced backward always, the value being unknown."""
    return traced or bool(grad_out != 1)


def _empty(like: Tensor) -> Tensor:
    """Stands in for an output that is not computed (a custom op returns tensors, never None)."""
    return like.new_empty(0)


# --- logits path -----------------------------------------------------------------------------------


def _logits_forward(engine: LogitsEngine, logits: Tensor, plan: Plan,
                    need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The output (Σ coef·loss, or per-position losses) and the gradient buffer, if asked."""
    with torch.autocast(logits.device.type, enabled=False):
        loss, grad = engine(logits, plan, need_grad)
    return ((loss * plan.coef).sum() if plan.scalar else loss), grad


def _logits_backward(grad: Tensor, grad_out: Tensor, scalar: bool, traced: bool) -> Tensor:
    if not scalar:
        return grad.mul_(grad_out.unsqueeze(-1).to(grad.dtype))
    return grad.mul_(grad_out.to(grad.dtype)) if _scaled(grad_out, traced) else grad


class SupportCrossEntropy(torch.autograd.Function):
    """Eager logits path: the gradient is made in forward, scaled in backward."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, plan: Plan, engine: LogitsEngine) -> Tensor:
        out, ctx.grad = _logits_forward(engine, logits, plan, ctx.needs_input_grad[0])
        ctx.scalar = plan.scalar
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], None, None]:
        grad, ctx.grad = ctx.grad, None  # hand the buffer over: autograd may keep it as .grad as is
        if grad is None:
            raise RuntimeError(SECOND_BACKWARD)
        return _logits_backward(grad, grad_out, ctx.scalar, traced=False), None, None


def logits_op(impl: str, engine: Callable[[], LogitsEngine]) -> Callable[[Tensor, Plan], Tensor]:
    """Register ``seqloss::logits_<impl>`` around the engine ``engine()`` returns; → ``run(logits, plan)``."""

    @torch.library.custom_op(f"seqloss::logits_{impl}", mutates_args=())
    def op(logits: Tensor, labels: Tensor, coef: Tensor, alphas: List[float], excludes: List[Optional[Tensor]],
           ids: List[Optional[Tensor]], positions: List[Tensor], label_smoothing: float, scalar: bool,
           sequence: Optional[Tensor], z_loss: float, softcap: Optional[float],
           need_grad: bool) -> Tuple[Tensor, Tensor]:
        plan = _plan(labels, coef, alphas, excludes, ids, positions, label_smoothing, scalar, sequence, z_loss,
                     softcap)
        out, grad = _logits_forward(engine(), logits, plan, need_grad)
        return out, grad if grad is not None else _empty(logits)

    @op.register_fake
    def _(logits, labels, coef, alphas, excludes, ids, positions, label_smoothing, scalar, sequence, z_loss,
          softcap, need_grad):
        out = logits.new_empty(() if scalar else labels.shape, dtype=torch.float32)
        return out, torch.empty_like(logits) if need_grad else _empty(logits)

    def setup_context(ctx, inputs, output):
        ctx.grad, ctx.scalar = output[1], inputs[8]
        ctx.no_grads = _no_grads(inputs)
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # else autograd would fill a (B, N, V) zero "gradient" of the buffer

    def backward(ctx, grad_out, _):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(SECOND_BACKWARD)
        # The custom op serves only traced calls (see ``run``), so its backward is always traced.
        return (_logits_backward(grad, grad_out, ctx.scalar, traced=True), *ctx.no_grads[1:])

    op.register_autograd(backward, setup_context=setup_context)

    def run(logits: Tensor, plan: Plan) -> Tensor:
        if not torch.compiler.is_compiling():
            return SupportCrossEntropy.apply(logits, plan, engine())
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        return op(logits, plan.labels, plan.coef, *_flat_parts(plan), plan.label_smoothing, plan.scalar,
                  plan.sequence, plan.z_loss, plan.softcap, need_grad)[0]

    return run


# --- fused head ------------------------------------------------------------------------------------


def compute_dtype(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> torch.dtype:
    """The dtype of the fused head's matmuls: autocast's where it is on (as ``F.linear`` under
    autocast), else the widest of the inputs' (type promotion; a bf16 hidden with an fp32 weight
    runs in fp32)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def _run_linear(engine: LinearEngine, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan,
                w_all: Optional[Tensor], dtype: torch.dtype,
                need: Sequence[bool]) -> tuple[Tensor, list[Optional[Tensor]]]:
    """Losses and the gradients ``need`` asks for, each in its input's dtype (None where not computed)."""
    with torch.autocast(hidden.device.type, enabled=False):
        loss, grads = engine(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), plan,
                             w_all, tuple(need))
    out: list[Optional[Tensor]] = []
    for g, like in ((grads.hidden, hidden), (grads.weight if grads.want_weight else None, weight),
                    (grads.bias, bias)):
        if g is not None and like is not None:
            # Not a view where the shapes agree: autograd adds a tied weight's other gradient in place
            # only into a tensor that is the sole user of its memory (else a third V × H buffer).
            g = (g if g.shape == like.shape else g.view_as(like)).to(like.dtype)
        out.append(None if like is None else g)
    return loss, out


def _linear_forward(engine: LinearEngine, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan,
                    dtype: torch.dtype, need: Sequence[bool]) -> tuple[Tensor, list[Optional[Tensor]]]:
    """The output and, for a scalar output, its gradients (made in forward; else all None)."""
    eager = plan.scalar and any(need)
    loss, grads = _run_linear(engine, hidden, weight, bias, plan, plan.coef if eager else None, dtype,
                              need if eager else (False,) * 3)
    return ((loss * plan.coef).sum() if plan.scalar else loss), grads


def _scale_in_place(grads: Sequence[Optional[Tensor]], grad_out: Tensor, traced: bool) -> list[Optional[Tensor]]:
    """The buffers are ours: scale in place, no second V × H tensor."""
    if not _scaled(grad_out, traced):
        return list(grads)
    return [None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads]


class LinearSupportCrossEntropy(torch.autograd.Function):
    """Eager fused head: scalar outputs scale the gradients made in forward; per-position outputs
    recompute them in backward with the incoming weights."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, engine: LinearEngine,
                dtype: torch.dtype) -> Tensor:
        need = tuple(ctx.needs_input_grad[:3])
        out, grads = _linear_forward(engine, hidden, weight, bias, plan, dtype, need)
        ctx.plan, ctx.engine, ctx.dtype, ctx.need = plan, engine, dtype, need
        ctx.grads = grads if plan.scalar else None
        if not plan.scalar:
            ctx.save_for_backward(hidden, weight, bias)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], ...]:
        if ctx.plan.scalar:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(SECOND_BACKWARD)
            out = _scale_in_place(grads, grad_out, traced=False)
        else:
            hidden, weight, bias = ctx.saved_tensors
            w_all = ctx.plan.coef * grad_out.float()
            out = _run_linear(ctx.engine, hidden, weight, bias, ctx.plan, w_all, ctx.dtype, ctx.need)[1]
        return (*out, None, None, None)


def linear_op(impl: str, engine: Callable[[], LinearEngine]) -> Callable[..., Tensor]:
    """Register ``seqloss::linear_<impl>`` (and its backward) around ``engine()``;
    → ``run(hidden, weight, bias, plan)``."""

    def filled(grads: Sequence[Optional[Tensor]], hidden: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g_hidden, g_weight, g_bias = (_empty(hidden) if g is None else g for g in grads)
        return g_hidden, g_weight, g_bias

    def fake_grads(hidden, weight, bias, need):
        return filled([torch.empty_like(t) if t is not None and n else None
                       for t, n in zip((hidden, weight, bias), need)], hidden)

    @torch.library.custom_op(f"seqloss::linear_{impl}", mutates_args=())
    def op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, coef: Tensor, alphas: List[float],
           excludes: List[Optional[Tensor]], ids: List[Optional[Tensor]], positions: List[Tensor],
           label_smoothing: float, scalar: bool, sequence: Optional[Tensor], z_loss: float,
           softcap: Optional[float], dtype: torch.dtype, need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        plan = _plan(labels, coef, alphas, excludes, ids, positions, label_smoothing, scalar, sequence, z_loss,
                     softcap)
        out, grads = _linear_forward(engine(), hidden, weight, bias, plan, dtype, need)
        return (out, *filled(grads, hidden))

    @op.register_fake
    def _(hidden, weight, bias, labels, coef, alphas, excludes, ids, positions, label_smoothing, scalar, sequence,
          z_loss, softcap, dtype, need):
        out = hidden.new_empty(() if scalar else labels.shape, dtype=torch.float32)
        return (out, *fake_grads(hidden, weight, bias, need if scalar else [False] * 3))

    @torch.library.custom_op(f"seqloss::linear_{impl}_backward", mutates_args=())
    def recompute(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, w_all: Tensor,
                  alphas: List[float], excludes: List[Optional[Tensor]], ids: List[Optional[Tensor]],
                  positions: List[Tensor], label_smoothing: float, sequence: Optional[Tensor], z_loss: float,
                  softcap: Optional[float], dtype: torch.dtype, need: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
        plan = _plan(labels, w_all, alphas, excludes, ids, positions, label_smoothing, False, sequence, z_loss,
                     softcap)
        return filled(_run_linear(engine(), hidden, weight, bias, plan, w_all, dtype, need)[1], hidden)

    @recompute.register_fake
    def _(hidden, weight, bias, labels, w_all, alphas, excludes, ids, positions, label_smoothing, sequence, z_loss,
          softcap, dtype, need):
        return fake_grads(hidden, weight, bias, need)

    def setup_context(ctx, inputs, output):
        (hidden, weight, bias, labels, coef, alphas, excludes, ids, positions, eps, scalar, sequence, z_loss, softcap,
         dtype, need) = inputs
        ctx.scalar, ctx.need, ctx.static = scalar, need, (alphas, eps, z_loss, softcap, dtype)
        ctx.n_parts = len(alphas)
        ctx.no_grads = _no_grads(inputs)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # the gradient outputs get no gradient (no V × H zeros filled)
        if scalar:
            ctx.grads = output[1:]
        else:  # backward recomputes from the inputs
            ctx.save_for_backward(hidden, weight, bias, labels, coef, sequence, *excludes, *ids, *positions)

    def backward(ctx, grad_out, *_):
        if ctx.scalar:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(SECOND_BACKWARD)
            grads = _scale_in_place([g if n else None for g, n in zip(grads, ctx.need)], grad_out, traced=True)
        else:
            hidden, weight, bias, labels, coef, sequence, *rest = ctx.saved_tensors
            k = ctx.n_parts
            alphas, eps, z_loss, softcap, dtype = ctx.static
            grads = recompute(hidden, weight, bias, labels, coef * grad_out.float(), alphas, list(rest[:k]),
                              list(rest[k:2 * k]), list(rest[2 * k:]), eps, sequence, z_loss, softcap, dtype,
                              ctx.need)
            grads = [g if n else None for g, n in zip(grads, ctx.need)]
        return (*grads, *ctx.no_grads[3:])

    op.register_autograd(backward, setup_context=setup_context)

    def run(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan) -> Tensor:
        dtype = compute_dtype(hidden, weight, bias)
        if not torch.compiler.is_compiling():
            return LinearSupportCrossEntropy.apply(hidden, weight, bias, plan, engine(), dtype)
        grad_mode = torch.is_grad_enabled()
        need = [grad_mode and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        return op(hidden, weight, bias, plan.labels, plan.coef, *_flat_parts(plan), plan.label_smoothing,
                  plan.scalar, plan.sequence, plan.z_loss, plan.softcap, dtype, need)[0]

    return run
