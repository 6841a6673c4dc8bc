"""The efficient logits path and the one dispatch point.

``SupportCrossEntropy`` is a custom ``autograd.Function`` that computes a weighted sum of support
rules (one for a plain objective, several for a mixture) without ever building a (B, N, V) mask or
a masked copy of the logits:

* list supports (SMILE, random subsetting, ``subset(include=)``) gather the K candidate logits of
  each position — O(K) work instead of O(V);
* full supports (MLE, reverse subsetting, selective EOS, ``subset(exclude=)``, SMILE's first token)
  stream over chunks of positions; each chunk is copied to fp32 once, its excluded ids are set to
  -inf in that copy, and the same copy becomes the chunk's gradient.

The gradient is computed in the forward pass and written once into a single (B, N, V) buffer (the
one tensor of that size a backward pass must produce anyway); backward only scales it. Nothing else
of that size stays alive between forward and backward.
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels, reference
from ._validate import Common, Member
from .rows import candidates, full_rows, list_rows
from .support import OBJECTIVES, FullSupport, Targets, shift_labels

# Positions per chunk of the full-vocabulary pass: about this many logits, so that a chunk's fp32
# copy stays in cache while it is masked, exponentiated, summed and turned into its gradient.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class Plan:
    """What the engine needs, built once per call from validated inputs."""

    labels: Tensor        # (B, N) long, 0 where there is no target (safe to gather)
    target_mask: Tensor   # (B, N) bool
    coef: Tensor          # (B, N) fp32 weight of each position in the output (0 = no target)
    members: List[Tuple[float, object]]  # (weight, FullSupport | ListSupport)
    label_smoothing: float
    scalar: bool          # output Σ coef·loss (mean / sum) instead of per-position losses


def zeros(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero tensor for a gradient buffer.

    On CPU it is an anonymous memory map advised for transparent huge pages: the kernel hands out
    pages already zeroed (no memset pass), and a 128 MiB buffer takes ~64 page faults instead of
    ~32,000 — which, for the sparse gradients of list supports and for the fused head's (V, H)
    weight gradient, is most of the cost. Elsewhere, ``torch.zeros``.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size(),
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)  # keeps the map alive


class _GradBuffer:
    """The one (B, N, V) gradient, written once: the first dense pass copies, later passes add."""

    def __init__(self, logits: Tensor, dense_first: bool) -> None:
        self.tensor = zeros(logits.shape, logits.dtype, logits.device)
        self.fresh = dense_first

    def rows(self) -> Tensor:
        return self.tensor.view(-1, self.tensor.shape[-1])


def _flat(logits: Tensor) -> Optional[Tensor]:
    """(B·N, V) view of the logits, or None when their strides do not allow one without a copy."""
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return None


def mostly(positions: Tensor) -> bool:
    """Whether at least half of the positions are set: then streaming every position in order
    (slices, no gathers) beats visiting only the listed ones."""
    return 2 * int(positions.sum()) >= positions.numel()


def _is_dense(logits: Tensor, positions: Tensor) -> bool:
    return _flat(logits) is not None and mostly(positions)


def _full_part(logits: Tensor, plan: Plan, alpha: float, exclude: Optional[Tensor], positions: Tensor,
               loss: Tensor, grad: Optional[_GradBuffer]) -> None:
    """Positions whose support is all V ids minus ``exclude`` (B, 1 or N, K), chunk by chunk.

    Dense case: contiguous ranges of positions, including the ones without a target (weight 0), so
    rows are sliced, not gathered. Sparse case (e.g. SMILE's first tokens): only the listed rows.
    """
    B, N, V = logits.shape
    eps = plan.label_smoothing
    chunk = max(1, CHUNK_ELEMENTS // V)
    dense = _is_dense(logits, positions)
    flat = torch.arange(B * N, device=logits.device) if dense else positions.flatten().nonzero().squeeze(1)
    for start in range(0, flat.numel(), chunk):
        idx = flat[start:start + chunk]                                # (C,)
        rows = slice(start, start + idx.numel())
        b, n = idx // N, idx % N
        # A private fp32 copy of the chunk, masked, exponentiated and turned into its gradient in place;
        # for fp32 logits streamed densely that copy is the gradient buffer's own rows.
        in_place = dense and grad is not None and grad.fresh and grad.tensor.dtype == torch.float32
        if in_place:
            z = grad.rows()[rows].copy_(_flat(logits)[rows])                # (C, V)
        elif dense:
            z = _flat(logits)[rows].to(torch.float32, copy=True)
        else:
            z = logits[b, n].float()
        y = plan.labels[b, n].unsqueeze(1)                             # (C, 1)
        on = positions[b, n].unsqueeze(1)                              # (C, 1)
        ex = None if exclude is None else exclude[b, n if exclude.shape[1] > 1 else 0]  # (C, K)
        w = None if grad is None else alpha * plan.coef[b, n].unsqueeze(1) * on
        tok = full_rows(z, y, ex, eps, w)
        loss.view(-1).index_add_(0, idx, alpha * torch.where(on, tok, 0.0).squeeze(1))
        if grad is None:
            continue
        if not dense:
            grad.rows().index_add_(0, idx, z.to(grad.tensor.dtype))
        elif grad.fresh:
            if not in_place:
                grad.rows()[rows].copy_(z)
        else:
            grad.rows()[rows].add_(z)
    if grad is not None and dense:
        grad.fresh = False


def _list_part(logits: Tensor, plan: Plan, alpha: float, ids: Tensor, positions: Tensor,
               loss: Tensor, grad: Optional[_GradBuffer]) -> None:
    """Positions whose support is the label plus ``ids`` (B, 1 or N, K): gather, never O(V)."""
    B, N, V = logits.shape
    y = plan.labels.unsqueeze(-1)                                      # (B, N, 1)
    cand, valid = candidates(ids.expand(B, N, ids.shape[-1]), y, positions)  # (B, N, K+1)
    w = None if grad is None else alpha * plan.coef.unsqueeze(-1)
    tok, g = list_rows(logits.gather(2, cand).float(), valid, plan.label_smoothing, w)
    loss.add_(alpha * tok.squeeze(-1))
    if g is not None:
        grad.tensor.scatter_add_(2, cand, g.to(grad.tensor.dtype))


class SupportPart(NamedTuple):
    """One part of a member's support over some positions (B, N): a full part (``ids`` None: every
    id but ``exclude``) or a list part (the label plus ``ids``)."""

    alpha: float
    exclude: Optional[Tensor]
    ids: Optional[Tensor]
    positions: Tensor


def support_parts(plan: Plan) -> List[SupportPart]:
    """The parts of the plan's members in order — the one place that splits SMILE's first tokens
    (all V ids) from its list positions; every engine walks this list."""
    parts = []
    for alpha, support in plan.members:
        if alpha == 0:
            continue
        if isinstance(support, FullSupport):
            parts.append(SupportPart(alpha, support.exclude, None, plan.target_mask))
            continue
        list_positions = plan.target_mask
        if support.full_positions is not None:
            full_positions = support.full_positions & plan.target_mask
            list_positions = plan.target_mask & ~full_positions
            parts.append(SupportPart(alpha, None, None, full_positions))
        parts.append(SupportPart(alpha, None, support.ids, list_positions))
    return parts


def engine_forward(logits: Tensor, plan: Plan, need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-position losses (B, N) fp32 and, if asked, the gradient of Σ coef·loss w.r.t. logits."""
    loss = torch.zeros(plan.labels.shape, dtype=torch.float32, device=logits.device)
    parts = support_parts(plan)
    grad = None
    if need_grad:
        grad = _GradBuffer(logits, bool(parts) and parts[0].ids is None and _is_dense(logits, parts[0].positions))
    for part in parts:
        if part.ids is None:
            _full_part(logits, plan, part.alpha, part.exclude, part.positions, loss, grad)
        else:
            _list_part(logits, plan, part.alpha, part.ids, part.positions, loss, grad)
    return loss, (grad.tensor if grad is not None else None)


class SupportCrossEntropy(torch.autograd.Function):
    """Cross-entropy over per-position supports; the gradient is made in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: Plan, engine: Callable) -> Tensor:
        loss, grad = engine(logits, plan, ctx.needs_input_grad[0])
        ctx.grad = grad
        ctx.scalar = plan.scalar
        return (loss * plan.coef).sum() if plan.scalar else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None  # hand the buffer over: autograd may keep it as .grad as is
        if grad is None:
            raise RuntimeError("seqloss: backward ran twice through the same loss; its gradient buffer "
                               "is consumed by the first backward (recompute the loss instead of "
                               "retain_graph=True)")
        if ctx.scalar:
            if bool(grad_output != 1):
                grad.mul_(grad_output.to(grad.dtype))
        else:
            grad.mul_(grad_output.unsqueeze(-1).to(grad.dtype))
        return grad, None, None


# --- dispatch ----------------------------------------------------------------------------------


def position_weights(target_mask: Tensor, c: Common) -> Tensor:
    """(B, N) fp32 weight of each position's loss in a scalar output (mean divides by the count)."""
    weights = target_mask.float()
    if c.reduction != "mean":
        return weights
    if c.num_items_in_batch is not None:
        denominator = torch.as_tensor(c.num_items_in_batch, dtype=torch.float32, device=weights.device)
    else:
        denominator = weights.sum().clamp_min(1.0)  # nothing supervised → 0, not NaN
    return weights / denominator


def resolve_impl(impl: str, tensor: Tensor) -> str:
    """The one place that decides which implementation runs.

    ``"auto"`` is ``"torch"``: the Triton kernels are verified (under Triton's interpreter) but not
    yet timed on a GPU, so nothing picks them unless asked for by name.
    """
    if impl == "triton":
        reason = kernels.unavailable_reason(tensor.device)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run: {reason}; use impl='torch' or impl='auto'")
    return "torch" if impl == "auto" else impl


def targets_of(labels: Tensor, c: Common, vocab_size: int) -> Targets:
    """Unshifted labels (B, N) → the shifted targets every support rule reads."""
    shifted = shift_labels(labels.long(), c.shift, c.ignore_index)
    return Targets(shifted, shifted != c.ignore_index, vocab_size, c.shift)


def plan_of(targets: Targets, members: List[Member], c: Common) -> Plan:
    """The support rules of the members (random draws happen here) and the position weights."""
    supports = [(w, OBJECTIVES[name].build(targets, **opts)) for w, name, opts in members]
    safe = torch.where(targets.target_mask, targets.labels, 0)
    return Plan(safe, targets.target_mask, position_weights(targets.target_mask, c), supports,
                float(c.label_smoothing), scalar=c.reduction in ("mean", "sum"))


def reference_loss(logits: Tensor, targets: Targets, members: List[Member], c: Common) -> Tensor:
    """The dense spec, reduced like the efficient path (per-position losses or Σ weight·loss)."""
    tok = reference.objective_token_losses(logits, targets, members, c.label_smoothing)
    return (tok * position_weights(targets.target_mask, c)).sum() if c.reduction in ("mean", "sum") else tok


def finish(out: Tensor, c: Common, lead: Tuple[int, ...], N: int) -> Tensor:
    """Engine output → the caller's shape: scalar, (..., N) for "none", (...) for "sequence"."""
    if c.reduction == "none":
        return out.reshape(*lead, N)
    return out.sum(-1).reshape(lead) if c.reduction == "sequence" else out


def dispatch(logits: Tensor, labels: Tensor, members: List[Member], c: Common) -> Tensor:
    """logits (..., N, V), labels (..., N) unshifted, validated → the reduced loss."""
    *lead, N, V = logits.shape
    B = math.prod(lead)
    targets = targets_of(labels.reshape(B, N), c, V)
    logits = logits.reshape(B, N, V)
    impl = resolve_impl(c.impl, logits)
    if impl == "reference":
        out = reference_loss(logits, targets, members, c)
    else:
        engine = kernels.logits_engine() if impl == "triton" else engine_forward
        out = SupportCrossEntropy.apply(logits, plan_of(targets, members, c), engine)
    return finish(out, c, tuple(lead), N)
