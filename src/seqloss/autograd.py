"""One helper makes every engine differentiable: ``Op``, for the logits path, the fused head
and sampled softmax alike.

An ``Op`` wraps an engine (``plan.Engine``) twice around the same engine calls:

* in eager mode, an ``autograd.Function`` (``EngineFunction``): no tracing machinery is imported or run;
* under ``torch.compile``, two ``torch.library`` custom ops (``seqloss::<name>`` and its backward)
  with fake implementations and registered autograd, so that Dynamo sees one opaque op of known
  output shapes and ``torch.compile(fullgraph=True)`` traces a loss call as plan building plus that
  op. The plan crosses the op boundary as one value (``Plan.arguments``/``Plan.from_arguments``).
  (A custom op cannot serve eager calls too: its first call imports the compiler stack, ~2 s and
  ~150 MB.)

Outputs: the loss — Σ coef·loss (mean / sum) or coef·loss per position — its z-loss part alike and
the argmax ids (both only with ``plan.stats``). Gradients: made in forward where the engine can
(scalar outputs; any output of a row-wise engine, the logits'), and only scaled by backward, in
place (the buffers are ours, and handed over as ``.grad`` without a copy); otherwise backward
recomputes them with the incoming weights.

Engines run with autocast disabled: their math is fp32 by design. The fused head's compute dtype
is read before that (autocast's dtype under autocast, as ``F.linear`` would; else the widest of
the inputs') and handed to the engine, which returns each gradient in its own input's dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._buffers import GradTriple
from .call import Call, SampledCall
from .plan import Engine, EngineOutput, Inputs, Plan, Result, SampledPlan, grads_in_forward

# The custom ops' signatures use typing.List/Tuple: torch.library infers their schemas from the
# annotations at run time, and torch 2.4 knows only the typing forms.

AnyPlan = Union[Plan, SampledPlan]
SECOND_BACKWARD = ("seqloss: backward ran twice through the same loss; its gradient buffers are consumed by the "
                   "first backward (recompute the loss instead of retain_graph=True)")


def compute_dtype(inputs: Sequence[Optional[Tensor]]) -> torch.dtype:
    """The dtype the engine's matmuls run in: autocast's where it is on (as ``F.linear`` under
    autocast), else the widest of the inputs' (type promotion; a bf16 hidden with an fp32 weight
    runs in fp32). The logits path ignores it."""
    device = inputs[0].device.type if inputs[0] is not None else "cpu"
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtypes = [x.dtype for x in inputs if x is not None]
    out = dtypes[0]
    for dtype in dtypes[1:]:
        out = torch.promote_types(out, dtype)
    return out


def _outputs(out: EngineOutput, plan: AnyPlan) -> tuple[Tensor, Tensor, Tensor]:
    """The engine's per-position values → the op's outputs: weighted by coef, summed for scalars."""
    if plan.scalar:  # Σ coef·loss as one product
        loss = torch.dot(out.loss.reshape(-1), plan.coef.reshape(-1))
        z = out.z_part.reshape(-1).dot(plan.coef.reshape(-1)) if out.z_part is not None else loss.new_empty(0)
    else:
        loss = out.loss * plan.coef
        z = out.z_part * plan.coef if out.z_part is not None else loss.new_empty(0)
    return loss, z, out.predicted if out.predicted is not None else plan.labels.new_empty(0)


def _scaled(grads: Sequence[Optional[Tensor]], grad_out: Tensor, traced: bool) -> GradTriple:
    """Gradients of Σ coef·loss → of Σ grad_out·(coef·loss), in place: a scalar's, unless it is 1 in
    eager (the usual ``loss.backward()``, which would cost a pass over the buffers); per position,
    each row by its position's (row-wise engines only)."""
    if grad_out.dim() == 0 and not traced and not bool(grad_out != 1):
        return grads[0], grads[1], grads[2]
    out = [None if g is None else g.mul_(grad_out.to(g.dtype).reshape(*grad_out.shape, *[1] * (g.dim() - grad_out.dim())))
           for g in grads]
    return out[0], out[1], out[2]


def _empty(like: Tensor) -> Tensor:
    """Stands in for an output that is not computed (a custom op returns tensors, never None)."""
    return like.new_empty(0)


class EngineFunction(torch.autograd.Function):
    """Eager: forward runs the engine; backward scales the gradients forward made, or recomputes."""

    @staticmethod
    def forward(ctx: Any, op: Op, plan: AnyPlan, dtype: torch.dtype, x0: Tensor, x1: Optional[Tensor],
                x2: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        engine = op.engine()
        in_forward = grads_in_forward(engine, plan)
        need = tuple(bool(n) for n in ctx.needs_input_grad[3:6])
        with torch.autocast(x0.device.type, enabled=False):
            out = engine.forward((x0, x1, x2), plan, need if in_forward else (False,) * 3, dtype)
        ctx.op, ctx.plan, ctx.dtype, ctx.need = op, plan, dtype, need
        ctx.set_materialize_grads(False)  # the z-loss part and the argmax ids take no gradient: no zeros for them
        ctx.grads = out.grads if in_forward else None
        if not in_forward:
            ctx.save_for_backward(x0, x1, x2)
        loss, z, predicted = _outputs(out, plan)
        ctx.mark_non_differentiable(z, predicted)
        return loss, z, predicted

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        if ctx.grads is None and not ctx.saved_tensors:
            raise RuntimeError(SECOND_BACKWARD)
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None  # hand the buffers over: autograd may keep them as .grad as is
            return (None, None, None, *_scaled(grads, grad_loss, traced=False))
        inputs, plan = ctx.saved_tensors, ctx.plan
        with torch.autocast(inputs[0].device.type, enabled=False):
            return (None, None, None, *ctx.op.engine().backward(inputs, plan, plan.coef * grad_loss.float(),
                                                                ctx.need, ctx.dtype))


class Op:
    """A differentiable engine call: ``op(inputs, call) → Result``. ``load`` returns the engine (the
    Triton ones import Triton: looked up at the first call); ``plan_of`` makes its plan from a call."""

    def __init__(self, name: str, load: Callable[[], Engine], plan_of: Callable[[Any], AnyPlan],
                 plan_type: Union[type[Plan], type[SampledPlan]]) -> None:
        self.name, self.load, self.plan_of, self.plan_type = name, load, plan_of, plan_type
        self._engine: Optional[Engine] = None
        self.compiled = _register(self)

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.load()
        return self._engine

    def __call__(self, inputs: Inputs, call: Union[Call, SampledCall]) -> Result:
        plan = self.plan_of(call)
        dtype = compute_dtype(inputs)
        if not torch.compiler.is_compiling():
            return Result(*EngineFunction.apply(self, plan, dtype, *inputs))
        need = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in inputs]
        loss, z, predicted = self.compiled(*inputs, *plan.arguments(), dtype, need)[:3]
        return Result(loss, z, predicted)

    def __repr__(self) -> str:
        return f"Op({self.name!r})"


def _register(op: Op) -> Callable[..., Any]:
    """``seqloss::<name>`` and its backward around ``op``'s engine, for traced calls only (an eager
    call never goes through them)."""

    def plan(tensors: Sequence[Optional[Tensor]], scalars: Sequence[float]) -> AnyPlan:
        return op.plan_type.from_arguments(tensors, scalars)

    @torch.library.custom_op(f"seqloss::{op.name}", mutates_args=())
    def forward(x0: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], tensors: List[Optional[Tensor]],
                scalars: List[float], dtype: torch.dtype,
                need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        p, engine = plan(tensors, scalars), op.engine()
        in_forward = grads_in_forward(engine, p)
        with torch.autocast(x0.device.type, enabled=False):
            out = engine.forward((x0, x1, x2), p, tuple(need) if in_forward else (False,) * 3, dtype)
        g0, g1, g2 = (_empty(x0) if g is None else g for g in out.grads)
        loss, z, predicted = _outputs(out, p)
        return loss, z, predicted, g0, g1, g2

    @forward.register_fake
    def _(x0, x1, x2, tensors, scalars, dtype, need):
        p = plan(tensors, scalars)
        labels = p.labels
        loss = x0.new_empty(() if p.scalar else labels.shape, dtype=torch.float32)
        z = x0.new_empty(() if p.scalar else labels.shape, dtype=torch.float32) if p.stats else _empty(loss)
        predicted = torch.empty_like(labels) if p.stats else _empty(labels)
        in_forward = grads_in_forward(op.engine(), p)
        grads = [torch.empty_like(x) if x is not None and n and in_forward else _empty(x0)
                 for x, n in zip((x0, x1, x2), need)]
        return (loss, z, predicted, *grads)

    @torch.library.custom_op(f"seqloss::{op.name}_backward", mutates_args=())
    def recompute(x0: Tensor, x1: Optional[Tensor], x2: Optional[Tensor], tensors: List[Optional[Tensor]],
                  scalars: List[float], dtype: torch.dtype, weights: Tensor,
                  need: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
        engine = op.engine()
        assert engine.backward is not None
        with torch.autocast(x0.device.type, enabled=False):
            grads = engine.backward((x0, x1, x2), plan(tensors, scalars), weights, tuple(need), dtype)
        out = [_empty(x0) if g is None else g for g in grads]
        return out[0], out[1], out[2]

    @recompute.register_fake
    def _(x0, x1, x2, tensors, scalars, dtype, weights, need):
        out = [torch.empty_like(x) if x is not None and n else _empty(x0) for x, n in zip((x0, x1, x2), need)]
        return out[0], out[1], out[2]

    def setup_context(ctx, inputs, output):
        x0, x1, x2, tensors, scalars, dtype, need = inputs
        p = plan(tensors, scalars)
        ctx.in_forward = grads_in_forward(op.engine(), p)
        # register_autograd wants a list of Nones back for a list of tensors, one None for a list with None in it
        ctx.static = ([None] * len(tensors) if all(isinstance(t, Tensor) for t in tensors) else None, scalars,
                      dtype, need)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # else autograd would fill zero "gradients" of the buffers
        if ctx.in_forward:
            ctx.grads = output[3:]
        else:  # backward recomputes from the inputs
            ctx.save_for_backward(x0, x1, x2, *tensors)

    def backward(ctx, grad_loss, *_):
        no_grads, scalars, dtype, need = ctx.static
        if ctx.in_forward:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError(SECOND_BACKWARD)
            out = _scaled([g if n else None for g, n in zip(grads, need)], grad_loss, traced=True)
        else:
            x0, x1, x2, *tensors = ctx.saved_tensors
            p = plan(tensors, scalars)
            grads = recompute(x0, x1, x2, tensors, scalars, dtype, p.coef * grad_loss.float(), need)
            out = tuple(g if n else None for g, n in zip(grads, need))
        return (*out, no_grads, None, None, None)

    forward.register_autograd(backward, setup_context=setup_context)
    return forward
