"""The torch engine of the logits path: a weighted sum of support parts without a (B, N, V) mask.

* list parts (SMILE, random subsetting, ``subset(include=)``) gather the K candidate logits of
  each position — O(K) work instead of O(V);
* full parts (MLE, reverse subsetting, selective EOS, ``subset(exclude=)``, SMILE's first token)
  stream over chunks of positions; each chunk is copied to fp32 once, its excluded ids are set to
  -inf in that copy, and the same copy becomes the chunk's gradient.

The gradient is computed in the forward pass and written once into a single (B, N, V) buffer (the
one tensor of that size a backward pass must produce anyway); backward only scales it.

Engine contract (shared with ``kernels.engine.logits_forward``):
``logits_forward(logits (B, N, V), plan, need_grad)`` → per-position losses (B, N) fp32 and, if
``need_grad``, the gradient of Σ coef·loss in the logits' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._buffers import zeros
from .plan import Plan, mostly
from .rows import candidates, cap_, full_rows, list_rows

# Positions per chunk of the full-vocabulary pass: about this many logits, so that a chunk's fp32
# copy stays in cache while it is masked, exponentiated, summed and turned into its gradient.
CHUNK_ELEMENTS = 1 << 20


class _GradBuffer:
    """The one (B, N, V) gradient, written once: the first dense pass copies, later passes add."""

    def __init__(self, logits: Tensor, dense_first: bool) -> None:
        self.tensor = zeros(tuple(logits.shape), logits.dtype, logits.device)
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
    flat_logits = _flat(logits)
    dense = flat_logits is not None and mostly(positions)
    flat = torch.arange(B * N, device=logits.device) if dense else positions.flatten().nonzero().squeeze(1)
    for start in range(0, flat.numel(), chunk):
        idx = flat[start:start + chunk]                                # (C,)
        rows = slice(start, start + idx.numel())
        b, n = idx // N, idx % N
        # A private fp32 copy of the chunk, masked, exponentiated and turned into its gradient in place;
        # for fp32 logits streamed densely that copy is the gradient buffer's own rows.
        in_place = dense and grad is not None and grad.fresh and grad.tensor.dtype == torch.float32
        if dense:
            assert flat_logits is not None
            z = (grad.rows()[rows].copy_(flat_logits[rows]) if in_place and grad is not None
                 else flat_logits[rows].to(torch.float32, copy=True))  # (C, V)
        else:
            z = logits[b, n].float()
        capped = None if plan.softcap is None else cap_(z, plan.softcap)
        y = plan.labels[b, n].unsqueeze(1)                             # (C, 1)
        on = positions[b, n].unsqueeze(1)                              # (C, 1)
        ex = None if exclude is None else exclude[b, n] if exclude.shape[1] > 1 else exclude[plan.list_of(b, n), 0]
        w = None if grad is None else alpha * plan.coef[b, n].unsqueeze(1) * on
        tok = full_rows(z, y, ex, eps, w, plan.z_loss)
        loss.view(-1).index_add_(0, idx, alpha * torch.where(on, tok, 0.0).squeeze(1))
        if grad is None:
            continue
        if capped is not None:
            z.mul_(capped)                                             # through the cap: · (1 - tanh²)
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
    per_position = ids[:, 0][plan.sequence] if ids.shape[1] == 1 and plan.sequence is not None else ids
    cand, valid = candidates(per_position.expand(B, N, ids.shape[-1]), y, positions)  # (B, N, K+1)
    w = None if grad is None else alpha * plan.coef.unsqueeze(-1)
    z = logits.gather(2, cand).float()                                 # (B, N, K+1), a new tensor
    capped = None if plan.softcap is None else cap_(z, plan.softcap)
    tok, g = list_rows(z, valid, plan.label_smoothing, w, plan.z_loss)
    loss.add_(alpha * tok.squeeze(-1))
    if g is not None and grad is not None:
        if capped is not None:
            g = g * capped
        grad.tensor.scatter_add_(2, cand, g.to(grad.tensor.dtype))


def logits_forward(logits: Tensor, plan: Plan, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Per-position losses (B, N) fp32 and, if asked, the gradient of Σ coef·loss w.r.t. logits."""
    loss = torch.zeros(plan.labels.shape, dtype=torch.float32, device=logits.device)
    parts = plan.parts
    grad = None
    if need_grad:
        grad = _GradBuffer(logits, bool(parts) and parts[0].ids is None and _is_dense(logits, parts[0].positions))
    for part in parts:
        if part.ids is None:
            _full_part(logits, plan, part.alpha, part.exclude, part.positions, loss, grad)
        else:
            _list_part(logits, plan, part.alpha, part.ids, part.positions, loss, grad)
    return loss, (grad.tensor if grad is not None else None)
