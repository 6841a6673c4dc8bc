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
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from ._validate import Common, Member
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


class _GradBuffer:
    """The one (B, N, V) gradient, written once: the first dense pass copies, later passes add."""

    def __init__(self, logits: Tensor, dense_first: bool) -> None:
        make = torch.empty_like if dense_first else torch.zeros_like
        self.tensor = make(logits, memory_format=torch.contiguous_format)
        self.fresh = dense_first

    def rows(self) -> Tensor:
        return self.tensor.view(-1, self.tensor.shape[-1])


def _flat(logits: Tensor) -> Optional[Tensor]:
    """(B·N, V) view of the logits, or None when their strides do not allow one without a copy."""
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return None


def _is_dense(logits: Tensor, positions: Tensor) -> bool:
    """Stream every position in order (no gather, no memset) when at least half of them need it."""
    return _flat(logits) is not None and 2 * int(positions.sum()) >= positions.numel()


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
        z_y = z.gather(1, y)                                           # (C, 1)
        size = torch.full_like(z_y, V)
        if exclude is not None:
            ex = exclude[b, n if exclude.shape[1] > 1 else 0]          # (C, K)
            drop = (ex >= 0) & (ex != y)
            ex = torch.where(drop, ex, y)                              # padding → the label, restored below
            size = size - drop.sum(1, keepdim=True)
        if eps:
            z_sum = z.sum(1, keepdim=True)
            if exclude is not None:
                z_sum = z_sum - (z.gather(1, ex) * drop).sum(1, keepdim=True)
        if exclude is not None:
            z.scatter_(1, ex, float("-inf")).scatter_(1, y, z_y)
        m = z.amax(1, keepdim=True)
        s = z.sub_(m).exp_().sum(1, keepdim=True)                       # z now holds exp(z - m)
        lse = m + s.log()
        tok = lse - z_y if not eps else lse - (1 - eps) * z_y - eps * z_sum / size
        loss.view(-1).index_add_(0, idx, alpha * torch.where(on, tok, 0.0).squeeze(1))
        if grad is None:
            continue
        w = alpha * plan.coef[b, n].unsqueeze(1) * on                  # (C, 1)
        z.mul_(w / s)                                                  # p · w
        if eps:
            z.sub_(w * eps / size)
            if exclude is not None:
                g_y = z.gather(1, y)
                z.scatter_(1, ex, 0.0).scatter_(1, y, g_y)
        z.scatter_add_(1, y, -w * (1 - eps))
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
    eps = plan.label_smoothing
    K = ids.shape[-1]
    y = plan.labels.unsqueeze(-1)                                      # (B, N, 1)
    ids = ids.expand(B, N, K)
    cand = torch.cat([ids.clamp(min=0), y], dim=-1)                    # (B, N, K+1), label last
    valid = torch.cat([(ids >= 0) & (ids != y), torch.ones_like(y, dtype=torch.bool)], dim=-1)
    valid &= positions.unsqueeze(-1)
    z = logits.gather(2, cand).float().masked_fill(~valid, float("-inf"))  # (B, N, K+1)
    m = z.amax(-1, keepdim=True).nan_to_num(neginf=0.0)                # rows with nothing valid → 0
    e = (z - m).exp()                                                   # 0 where invalid
    s = e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    lse = m + s.log()
    z_y = z[..., K:]
    if eps:
        size = valid.sum(-1, keepdim=True).clamp_min(1)
        z_sum = z.masked_fill(~valid, 0.0).sum(-1, keepdim=True)
        tok = lse - (1 - eps) * z_y - eps * z_sum / size
    else:
        tok = lse - z_y
    loss.add_(alpha * torch.where(positions, tok.squeeze(-1), 0.0))
    if grad is None:
        return
    w = (alpha * plan.coef * positions).unsqueeze(-1)                  # (B, N, 1)
    g = e * (w / s)
    if eps:
        g = g - (w * eps / size) * valid
    g[..., K:] -= w * (1 - eps)
    grad.tensor.scatter_add_(2, cand, g.to(grad.tensor.dtype))


def engine_forward(logits: Tensor, plan: Plan, need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-position losses (B, N) fp32 and, if asked, the gradient of Σ coef·loss w.r.t. logits."""
    loss = torch.zeros(plan.labels.shape, dtype=torch.float32, device=logits.device)
    active = [(alpha, support) for alpha, support in plan.members if alpha != 0]
    grad = None
    if need_grad:
        first = active[0][1] if active else None
        grad = _GradBuffer(logits, isinstance(first, FullSupport) and _is_dense(logits, plan.target_mask))
    for alpha, support in active:
        if isinstance(support, FullSupport):
            _full_part(logits, plan, alpha, support.exclude, plan.target_mask, loss, grad)
            continue
        list_positions = plan.target_mask
        if support.full_positions is not None:
            full_positions = support.full_positions & plan.target_mask
            list_positions = plan.target_mask & ~full_positions
            _full_part(logits, plan, alpha, None, full_positions, loss, grad)
        _list_part(logits, plan, alpha, support.ids, list_positions, loss, grad)
    return loss, (grad.tensor if grad is not None else None)


class SupportCrossEntropy(torch.autograd.Function):
    """Cross-entropy over per-position supports; the gradient is made in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: Plan) -> Tensor:
        loss, grad = engine_forward(logits, plan, need_grad=ctx.needs_input_grad[0])
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
        return grad, None


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


def resolve_impl(impl: str, logits: Tensor) -> str:
    """The one place that decides which implementation runs."""
    if impl == "triton":
        raise ValueError("impl='triton' is not available in this version of seqloss; "
                         "use impl='torch' (any device) or impl='auto'")
    return "torch" if impl == "auto" else impl


def dispatch(logits: Tensor, labels: Tensor, members: List[Member], c: Common) -> Tensor:
    """logits (B, N, V), labels (B, N) unshifted, validated → the reduced loss."""
    B, N, V = logits.shape
    shifted = shift_labels(labels.long(), c.shift, c.ignore_index)
    target_mask = shifted != c.ignore_index
    targets = Targets(shifted, target_mask, V, c.shift)
    coef = position_weights(target_mask, c)
    impl = resolve_impl(c.impl, logits)
    if impl == "reference":
        tok = reference.objective_token_losses(logits, targets, members, c.label_smoothing)
        out = (tok * coef).sum() if c.reduction in ("mean", "sum") else tok
    else:
        supports = [(w, OBJECTIVES[name].build(targets, **opts)) for w, name, opts in members]
        safe = torch.where(target_mask, shifted, 0)
        plan = Plan(safe, target_mask, coef, supports, float(c.label_smoothing),
                    scalar=c.reduction in ("mean", "sum"))
        out = SupportCrossEntropy.apply(logits, plan)
    return out.sum(-1) if c.reduction == "sequence" else out
