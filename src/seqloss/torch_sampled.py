"""The torch engine of ``sampled_softmax_loss``: fused by construction.

Only the rows of the head's weight that a call scores are read: the T supervised labels' and the K
drawn negatives' (shared), or T·K (one set per position, gathered chunk by chunk so that no
(T, K, H) tensor exists). The exponentiated scores (T, K) become the scores' gradient in place; the
weight gradient is written only at the scored rows: on CPU into a zero buffer that the kernel
faults in page by page (no memset of, and no pass over, the V × H buffer), on GPUs into
``torch.zeros``. The math is fp32 whatever the inputs' dtype; each gradient comes back in its
input's dtype. Scalar outputs get their gradients in forward; per-position ones recompute in
backward (engine contract: see ``plan.Engine``).

Per position t with label score s_t and negative scores S[t, k] (lowered by log(K·q) with the
log-Q correction, -inf at accidental hits), lse_t = log(exp(s_t) + Σ_k exp(S[t, k])) and

    loss_t = (1 - ε)·(lse_t - s_t) + ε·(lse_t - (s_t + Σ_kept S[t, k]) / n_t)      (n_t = 1 + kept draws)
    d loss_t / d S[t, k] = p[t, k] - ε·kept[t, k] / n_t,   d loss_t / d s_t = p_t - (1 - ε) - ε / n_t
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._buffers import GradTriple, zeros
from .plan import Engine, EngineOutput, Inputs, Need, SampledPlan

# Per-position negatives are scored in chunks of positions holding at most this many gathered
# weight elements (chunk · K · H): 4 Mi fp32 elements, 16 MiB.
CHUNK_ELEMENTS = 1 << 22


def _chunks(T: int, K: int, H: int) -> list[slice]:
    size = max(1, CHUNK_ELEMENTS // max(K * H, 1))
    return [slice(start, min(start + size, T)) for start in range(0, T, size)]


def _negative_scores(h: Tensor, weight: Tensor, ids: Tensor, lowering: Optional[Tensor]) -> Tensor:
    """(T, K) fp32 scores h·w_id (minus ``lowering``) for shared (K,) or per-position (T, K) ids."""
    T, H = h.shape
    if ids.dim() == 1:
        rows = weight.index_select(0, ids).float()                                   # (K, H)
        if lowering is None:
            return h @ rows.t()
        return torch.addmm(lowering.neg().expand(T, -1), h, rows.t())               # one pass writes (T, K)
    K = ids.shape[1]
    scores = torch.empty((T, K), dtype=torch.float32, device=h.device)
    for part in _chunks(T, K, H):
        rows = weight.index_select(0, ids[part].reshape(-1)).float().view(-1, K, H)  # (C, K, H)
        torch.bmm(rows, h[part].unsqueeze(2), out=scores[part].unsqueeze(2))
    if lowering is not None:
        scores.sub_(lowering)
    return scores


def _hits(ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(rows, columns) of the draws equal to their position's label. Shared negatives: found by
    binary search in the sorted draws, O(T log K), not by comparing all T·K pairs."""
    if ids.dim() == 2:
        found = (ids == labels.unsqueeze(1)).nonzero()
        return found[:, 0], found[:, 1]
    sorted_ids, order = ids.sort()
    first = torch.searchsorted(sorted_ids, labels)
    counts = torch.searchsorted(sorted_ids, labels, right=True) - first                # (T,) draws of each label
    rows = torch.repeat_interleave(torch.arange(labels.shape[0], device=ids.device), counts)
    offset = torch.arange(rows.shape[0], device=ids.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return rows, order[first[rows] + offset]


class State(NamedTuple):
    """What forward leaves for the gradients: exp(S - top) (T, K), exp(s - top), their total (T,),
    the support sizes (T,) and the accidental hits (rows, columns) or None."""

    exp_scores: Tensor
    exp_positive: Tensor
    total: Tensor
    size: Tensor
    hits: Optional[tuple[Tensor, Tensor]]


def sampled_forward(hidden: Tensor, weight: Tensor, labels: Tensor, ids: Tensor, lowering: Optional[Tensor],
                    label_smoothing: float, remove_accidental_hits: bool) -> tuple[Tensor, State]:
    """(T,) fp32 losses and the state their gradients need (see the module docstring)."""
    T, K = labels.shape[0], ids.shape[-1]
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.float()
        positive = (h * weight.index_select(0, labels).float()).sum(1)                         # (T,)
        scores = _negative_scores(h, weight, ids, lowering)                                     # (T, K)
        hits = _hits(ids, labels) if remove_accidental_hits else None
        size = torch.full((T,), K + 1.0, device=h.device)                                       # 1 + kept draws
        if hits is not None:
            size.index_add_(0, hits[0], torch.full(hits[0].shape, -1.0, device=h.device))
        kept_sum = None
        if label_smoothing > 0:
            kept_sum = scores.sum(1)
            if hits is not None:
                kept_sum.index_add_(0, hits[0], -scores[hits])
        if hits is not None:
            scores[hits] = float("-inf")
        top = torch.maximum(scores.amax(1), positive) if K else positive
        exp_scores = scores.sub_(top.unsqueeze(1)).exp_()                                       # in place: (T, K)
        exp_positive = (positive - top).exp()
        total = exp_scores.sum(1) + exp_positive
        lse = top + total.log()
        loss = lse - positive
        if kept_sum is not None:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - (positive + kept_sum) / size)
    return loss, State(exp_scores, exp_positive, total, size, hits)


def sampled_gradients(hidden: Tensor, weight: Tensor, labels: Tensor, ids: Tensor, state: State,
                      label_smoothing: float, grad_loss: Tensor, want_h: bool,
                      want_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The gradients of Σ grad_loss·loss for hidden and weight (each in its dtype), consuming the state."""
    eps, hits = label_smoothing, state.hits
    with torch.autocast(hidden.device.type, enabled=False):
        g = grad_loss.float()
        grad_scores = state.exp_scores.mul_((g / state.total).unsqueeze(1))                     # in place: (T, K)
        if eps > 0:
            grad_scores.sub_((eps * g / state.size).unsqueeze(1))
            if hits is not None:
                grad_scores[hits] = 0.0
        grad_positive = g * (state.exp_positive / state.total - (1 - eps) - eps / state.size)  # (T,)
        h = hidden.float()
        grad_h = grad_positive.unsqueeze(1) * weight.index_select(0, labels).float() if want_h else None
        grad_w = RowsGradient(weight) if want_w else None
        if grad_w is not None:
            grad_w.add(labels, grad_positive.unsqueeze(1) * h)
        if ids.dim() == 1:
            if grad_h is not None:
                grad_h.addmm_(grad_scores, weight.index_select(0, ids).float())
            if grad_w is not None:
                grad_w.add(ids, grad_scores.t() @ h)                                            # (K, H)
        else:
            T, K = ids.shape
            H = h.shape[1]
            for part in _chunks(T, K, H):
                g_part = grad_scores[part].unsqueeze(1)                                         # (C, 1, K)
                if grad_h is not None:
                    rows = weight.index_select(0, ids[part].reshape(-1)).float().view(-1, K, H)
                    grad_h[part] += torch.bmm(g_part, rows).squeeze(1)
                if grad_w is not None:
                    grad_w.add(ids[part].reshape(-1), (g_part.transpose(1, 2) * h[part].unsqueeze(1)).view(-1, H))
    return (None if grad_h is None else grad_h.to(hidden.dtype)), (None if grad_w is None else grad_w.result())


class RowsGradient:
    """The weight gradient, written only at the scored rows: an fp32 zero (V, H) buffer whose pages
    the kernel faults in as rows are first written (no memset, no pass over V × H). Low-precision
    weights get their dtype's copy of the touched rows only, so repeated ids sum in fp32."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self.sums = zeros(tuple(weight.shape), torch.float32, weight.device, huge_pages=False)
        self.touched: list[Tensor] = []

    def add(self, index: Tensor, rows: Tensor) -> None:
        """weight_grad[index] += rows (M, H) fp32, repeated ids accumulating."""
        self.sums.index_add_(0, index, rows)
        if self.weight.dtype != torch.float32:
            self.touched.append(index)

    def result(self) -> Tensor:
        if self.weight.dtype == torch.float32:
            return self.sums
        grad = zeros(tuple(self.weight.shape), self.weight.dtype, self.weight.device, huge_pages=False)
        touched = torch.unique(torch.cat(self.touched))
        return grad.index_copy_(0, touched, self.sums[touched].to(self.weight.dtype))


def forward(inputs: Inputs, plan: SampledPlan, need: Need, dtype: torch.dtype,
            weights: Optional[Tensor] = None) -> EngineOutput:
    """Per-position losses (B, N) of hidden (B, N, H) against the head and, for the inputs ``need``
    asks, the gradients of Σ coef·loss (or Σ weights·loss, backward's recompute)."""
    hidden, weight = inputs[0], inputs[1]
    assert weight is not None
    B, N, H = hidden.shape
    mask = plan.target_mask.reshape(-1)
    h = hidden.reshape(-1, H)[mask]                                                            # (T, H)
    y = plan.labels.reshape(-1)[mask]
    shared = plan.negatives.dim() == 1
    ids = plan.negatives if shared else plan.negatives[mask]
    lowering = plan.lowering if plan.lowering is None or shared else plan.lowering[mask]
    eps = plan.softmax.label_smoothing
    loss, state = sampled_forward(h, weight, y, ids, lowering, eps, plan.remove_accidental_hits)
    out = torch.zeros(B * N, dtype=torch.float32, device=hidden.device).masked_scatter_(mask, loss)
    w = weights if weights is not None else plan.coef if any(need) else None
    grads: GradTriple = (None, None, None)
    if w is not None:
        grad_h, grad_w = sampled_gradients(h, weight, y, ids, state, eps, w.reshape(-1)[mask], need[0], need[1])
        full_h = None if grad_h is None else hidden.new_zeros(hidden.shape).index_put_((plan.target_mask,), grad_h)
        grads = (full_h, grad_w, None)
    return EngineOutput(out.view(B, N), grads)


def backward(inputs: Inputs, plan: SampledPlan, weights: Tensor, need: Need, dtype: torch.dtype) -> GradTriple:
    return forward(inputs, plan, need, dtype, weights).grads


def engine() -> Engine:
    """This engine: scalar outputs get their gradients in forward, per-position ones recompute."""
    return Engine(forward, backward, rowwise=False)
