"""The torch engine of the logits path: a weighted sum of support parts without a (B, N, V) mask.

* list parts (SMILE, random subsetting, ``subset(include=)``) gather the K candidate logits of
  each position — O(K) work instead of O(V);
* full parts (MLE, reverse subsetting, selective EOS, ``subset(exclude=)``, SMILE's first token)
  stream over chunks of positions; each chunk is copied to fp32 once, its excluded ids are set to
  -inf in that copy, and the same copy becomes the chunk's gradient.

The gradient is computed in the forward pass and written once into a single (B, N, V) buffer (the
one tensor of that size a backward pass must produce anyway); backward only scales it. With
``plan.stats`` the full parts also hand back each position's argmax (the positions only list parts
score get one more gathered pass, without gradients).

Engine contract: see ``plan.Engine`` (``inputs`` = (logits (B, N, V), None, None)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._buffers import zeros
from .plan import Engine, EngineOutput, Inputs, Need, Plan, mostly
from .token_math import PositionSums, candidate_support, candidates, capped_argmax, full_support

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
               sums: PositionSums, grad: Optional[_GradBuffer]) -> None:
    """Positions whose support is all V ids minus ``exclude`` (L, K), chunk by chunk.

    Dense case: contiguous ranges of positions, including the ones without a target (weight 0), so
    rows are sliced, not gathered. Sparse case (e.g. SMILE's first tokens): only the listed rows.
    """
    B, N, V = logits.shape
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
        on = positions[b, n]                                           # (C,)
        w = None if grad is None else alpha * (plan.coef[b, n] * on).unsqueeze(1)
        ex = None if exclude is None else exclude[plan.list_of(b, n)]  # (C, K)
        terms = full_support(z, plan.labels[b, n].unsqueeze(1), ex, w, plan.softmax, predict=plan.stats)
        sums.add(idx, alpha, terms, on)
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
               sums: PositionSums, grad: Optional[_GradBuffer]) -> None:
    """Positions whose support is the label plus ``ids`` (L, 1, K) or (B, N, K): gather, never O(V)."""
    B, N, V = logits.shape
    y = plan.labels.unsqueeze(-1)                                      # (B, N, 1)
    per_position = ids[:, 0][plan.sequence] if ids.shape[1] == 1 and plan.sequence is not None else ids
    cand, valid = candidates(per_position.expand(B, N, ids.shape[-1]), y, positions)  # (B, N, K+1)
    w = None if grad is None else alpha * plan.coef.unsqueeze(-1)
    z = logits.gather(2, cand).float()                                 # (B, N, K+1), a new tensor
    terms, g = candidate_support(z, valid, w, plan.softmax)
    sums.add(torch.arange(B * N, device=logits.device), alpha, terms)
    if g is not None and grad is not None:
        grad.tensor.scatter_add_(2, cand, g.to(grad.tensor.dtype))


def _predict_rest(logits: Tensor, plan: Plan, sums: PositionSums) -> None:
    """The argmax of the supervised positions no full part visited, chunk by chunk."""
    B, N, V = logits.shape
    rest = sums.unpredicted(plan.target_mask)
    for start in range(0, rest.numel(), max(1, CHUNK_ELEMENTS // V)):
        idx = rest[start:start + max(1, CHUNK_ELEMENTS // V)]
        sums.set_predicted(idx, capped_argmax(logits[idx // N, idx % N].float(), plan.softmax))


def forward(inputs: Inputs, plan: Plan, need: Need, dtype: torch.dtype) -> EngineOutput:
    """Per-position losses (B, N) fp32 and, if ``need`` asks, the gradient of Σ coef·loss w.r.t. the logits."""
    logits = inputs[0]
    B, N, V = logits.shape
    sums = PositionSums(B * N, logits.device, plan.stats)
    parts = plan.parts
    grad = None
    if need[0]:
        grad = _GradBuffer(logits, bool(parts) and parts[0].ids is None and _is_dense(logits, parts[0].positions))
    for part in parts:
        if part.ids is None:
            _full_part(logits, plan, part.alpha, part.exclude, part.positions, sums, grad)
        else:
            _list_part(logits, plan, part.alpha, part.ids, part.positions, sums, grad)
    if plan.stats:
        _predict_rest(logits, plan, sums)
    return EngineOutput(sums.loss.view(B, N), (None if grad is None else grad.tensor, None, None),
                        None if sums.z_part is None else sums.z_part.view(B, N),
                        None if sums.predicted is None else sums.predicted.view(B, N))


def engine() -> Engine:
    """This engine: its gradient rows are the logits', one per position."""
    return Engine(forward, None, rowwise=True)
