"""The torch engine of ``sampled_softmax_loss``: fused by construction.

Only the rows of the head's weight that a call scores are read: the T labels' and the K drawn
negatives' (shared), or T·K (one set per position, gathered chunk by chunk so that no (T, K, H)
tensor exists). Forward leaves the exponentiated scores (T, K) for backward, which turns them into
the scores' gradient in place; the weight gradient is written only at the scored rows: on CPU into
a zero buffer that the kernel faults in page by page (no memset of, and no pass over, the V × H
buffer), on GPUs into ``torch.zeros``. The math is fp32 whatever the inputs' dtype (autocast is
switched off inside); each gradient comes back in its input's dtype. Eager calls run
:class:`SampledSoftmax`; under ``torch.compile`` the same two functions (``sampled_forward``,
``sampled_gradients``) run inside two custom ops (``seqloss::sampled_softmax`` and its backward).

Per position t with label score s_t and negative scores S[t, k] (lowered by log(K·q) with the
log-Q correction, -inf at accidental hits), lse_t = log(exp(s_t) + Σ_k exp(S[t, k])) and

    loss_t = (1 - ε)·(lse_t - s_t) + ε·(lse_t - (s_t + Σ_kept S[t, k]) / n_t)      (n_t = 1 + kept draws)
    d loss_t / d S[t, k] = p[t, k] - ε·kept[t, k] / n_t,   d loss_t / d s_t = p_t - (1 - ε) - ε / n_t
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._buffers import zeros
from .sampling import Negatives

# Per-position negatives are scored in chunks of positions holding at most this many gathered
# weight elements (chunk · K · H): 4 Mi fp32 elements, 16 MiB.
CHUNK_ELEMENTS = 1 << 22
SECOND_BACKWARD = ("seqloss: backward ran twice through the same sampled_softmax_loss; its buffers are consumed by "
                   "the first backward (recompute the loss instead of retain_graph=True)")


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


class SampledSoftmax(torch.autograd.Function):
    """Eager: per-position losses (T,) of ``hidden`` (T, H) against the rows of ``weight`` named by
    ``labels`` (T,) and negatives ``ids`` (K,) or (T, K); backward consumes forward's state."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, ids: Tensor, lowering: Optional[Tensor],
                label_smoothing: float, remove_accidental_hits: bool) -> Tensor:
        loss, state = sampled_forward(hidden, weight, labels, ids, lowering, label_smoothing, remove_accidental_hits)
        ctx.save_for_backward(hidden, weight, labels, ids)
        ctx.state, ctx.label_smoothing = state, label_smoothing
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Optional[Tensor], ...]:
        state, ctx.state = ctx.state, None
        if state is None:
            raise RuntimeError(SECOND_BACKWARD)
        hidden, weight, labels, ids = ctx.saved_tensors
        grad_h, grad_w = sampled_gradients(hidden, weight, labels, ids, state, ctx.label_smoothing, grad_loss,
                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_h, grad_w, None, None, None, None, None


# --- under torch.compile: opaque custom ops of known output shapes ----------------------------------
#
# (Their signatures use typing.List/Tuple: torch 2.4 infers op schemas only from those.)
# Dynamo cannot trace the data-dependent engine (the supervised positions, the hits), so a traced
# call sees two custom ops over all M = B·N positions (ids (K,) or (M, K)): the losses (M,), 0 off
# target, and, in backward, the recomputed gradients. As for the objectives' ops, an eager call never
# goes through them (their first call imports the compiler stack).


def _supervised(target_mask: Tensor, labels: Tensor, ids: Tensor,
                lowering: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    if ids.dim() == 1:
        return labels[target_mask], ids, lowering
    return labels[target_mask], ids[target_mask], None if lowering is None else lowering[target_mask]


@torch.library.custom_op("seqloss::sampled_softmax", mutates_args=())
def sampled_op(hidden: Tensor, weight: Tensor, labels: Tensor, target_mask: Tensor, ids: Tensor,
               lowering: Optional[Tensor], label_smoothing: float, remove_accidental_hits: bool) -> Tensor:
    y, n, lw = _supervised(target_mask, labels, ids, lowering)
    loss, _ = sampled_forward(hidden[target_mask], weight, y, n, lw, label_smoothing, remove_accidental_hits)
    return torch.zeros(labels.shape, device=hidden.device).masked_scatter_(target_mask, loss)


@sampled_op.register_fake
def _(hidden, weight, labels, target_mask, ids, lowering, label_smoothing, remove_accidental_hits):
    return hidden.new_empty(labels.shape, dtype=torch.float32)


@torch.library.custom_op("seqloss::sampled_softmax_backward", mutates_args=())
def sampled_backward_op(hidden: Tensor, weight: Tensor, labels: Tensor, target_mask: Tensor, ids: Tensor,
                        lowering: Optional[Tensor], label_smoothing: float, remove_accidental_hits: bool,
                        grad_loss: Tensor, need: List[bool]) -> Tuple[Tensor, Tensor]:
    y, n, lw = _supervised(target_mask, labels, ids, lowering)
    h = hidden[target_mask]
    _, state = sampled_forward(h, weight, y, n, lw, label_smoothing, remove_accidental_hits)
    grad_h, grad_w = sampled_gradients(h, weight, y, n, state, label_smoothing, grad_loss[target_mask], need[0], need[1])
    full_h = hidden.new_zeros(hidden.shape).index_put_((target_mask,), grad_h) if grad_h is not None else None
    return (hidden.new_empty(0) if full_h is None else full_h), (weight.new_empty(0) if grad_w is None else grad_w)


@sampled_backward_op.register_fake
def _(hidden, weight, labels, target_mask, ids, lowering, label_smoothing, remove_accidental_hits, grad_loss, need):
    return (torch.empty_like(hidden) if need[0] else hidden.new_empty(0),
            torch.empty_like(weight) if need[1] else weight.new_empty(0))


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    hidden, weight, labels, target_mask, ids, lowering, label_smoothing, remove = inputs
    ctx.save_for_backward(hidden, weight, labels, target_mask, ids, lowering)
    ctx.static = (label_smoothing, remove)


def _backward(ctx: Any, grad_loss: Tensor) -> tuple[Optional[Tensor], ...]:
    hidden, weight, labels, target_mask, ids, lowering = ctx.saved_tensors
    need = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    grad_h, grad_w = sampled_backward_op(hidden, weight, labels, target_mask, ids, lowering, *ctx.static,
                                         grad_loss, need)
    return (grad_h if need[0] else None), (grad_w if need[1] else None), None, None, None, None, None, None


sampled_op.register_autograd(_backward, setup_context=_setup_context)


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


def sampled_token_losses(hidden: Tensor, weight: Tensor, labels: Tensor, negatives: Negatives, *,
                         label_smoothing: float, log_q_correction: bool, remove_accidental_hits: bool) -> Tensor:
    """(T,) fp32 losses of the supervised positions: ``hidden`` (T, H), ``labels`` (T,), negatives
    (K,) shared or (T, K) per position. The semantics are ``reference.sampled_token_losses``'s."""
    lowering = negatives.log_expected if log_q_correction else None
    loss: Tensor = SampledSoftmax.apply(hidden, weight, labels, negatives.ids, lowering, float(label_smoothing),
                                        remove_accidental_hits)
    return loss
