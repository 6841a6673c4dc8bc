"""The logits path on a vocabulary shard: every objective, exact, with two all-reduces per call.

Each rank holds logits (B, N, V/R) for ids [start, stop) and the whole plan (global ids). For every
position a part scores, a rank computes over its ids of the part's support: the largest logit m_r,
the sum of exponentials s_r relative to it, the label's logit if it holds the label, and (with label
smoothing) the support's logit sum. Then:

1. one all-reduce (MAX) of m_r → M: the (P,) stabiliser;
2. one all-reduce (SUM) of [s_r·exp(m_r - M), z_y, (Σz)] → lse = M + log Σ, the label's logit and
   the support's sum: (2 or 3) × (P,).

P is the number of (part, position) pairs scored: the supervised positions for MLE and for SMILE
(its first-token positions and list positions are disjoint), so MLE and SMILE cost 3 × (B·N)
floats at most — Megatron-LM's three (B, N) all-reduces — and a mixture of two objectives twice
that. Nothing of vocabulary size is ever sent. The gradient needs no collective: with lse known,
each rank writes its own columns in a second pass over its logits. ``return_stats`` adds one MAX and
one MIN of (B·N,) for the argmax over the whole vocabulary; ``random_subset`` one all-reduce of two
numbers that checks every rank drew the same ids.

Engine contract: ``plan.Engine`` (``inputs`` = (local logits (B, N, V/R), None, None), ``plan.shard`` set).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._buffers import zeros
from ..call import SoftmaxOptions
from ..plan import Engine, EngineOutput, Inputs, Need, Plan, SupportPart
from ..token_math import PositionSums, TokenTerms, candidates, cap_
from . import collectives

CHUNK_ELEMENTS = 1 << 20


class Local(NamedTuple):
    """One part's per-position values on this rank's ids, (P,) each, at the flat positions ``at``."""

    at: Tensor
    m: Tensor          # largest logit of the rank's support ids (-inf: none here)
    s: Tensor          # Σ exp(z - m) over them (0: none)
    z_y: Tensor        # the label's logit where this rank holds it, else 0
    z_sum: Tensor      # Σ z over the rank's support ids (label smoothing)
    size: Tensor       # the support's size (global, the same on every rank)


def _capped(z: Tensor, softmax: SoftmaxOptions) -> Optional[Tensor]:
    """Cap ``z`` in place where the call soft-caps; the cap's slope, or None."""
    _, _, softcap = softmax
    return cap_(z, softcap) if softcap else None


def _full_rows(logits: Tensor, plan: Plan, exclude: Optional[Tensor], idx: Tensor):
    """For positions ``idx`` (C,) of a full part: the capped fp32 logits (C, V/R), the cap's slope,
    which local ids the exclusion takes out (C, V/R) bool or None, the label's local column and
    whether this rank holds it, and the support's global size (C,)."""
    B, N, Vr = logits.shape
    shard = plan.shard
    assert shard is not None and Vr > 0
    b, n = idx // N, idx % N
    z = logits[b, n].float()                                            # (C, V/R), a new tensor
    slope = _capped(z, plan.softmax)
    y = plan.labels[b, n]
    own = (y >= shard.start) & (y < shard.stop)
    column = (y - shard.start).clamp(0, Vr - 1)
    size = torch.full((idx.numel(),), float(shard.vocab_size), device=z.device)
    out = None
    if exclude is not None:
        ex = exclude[plan.list_of(b, n)]                                # (C, K) global ids
        drop = (ex >= 0) & (ex != y.unsqueeze(1))
        size = size - drop.sum(1)
        here = drop & (ex >= shard.start) & (ex < shard.stop)
        out = torch.zeros_like(z).scatter_add_(1, (ex - shard.start).clamp(0, Vr - 1), here.float()) > 0
    return z, slope, out, column, own, size


def _full_local(logits: Tensor, plan: Plan, part: SupportPart) -> Local:
    Vr = logits.shape[-1]
    index = part.positions.reshape(-1).nonzero().squeeze(1)
    if Vr == 0 or index.numel() == 0:                                   # no ids here: nothing to add
        empty = torch.zeros(index.numel(), device=logits.device)
        size = _global_size(plan, part, index)
        return Local(index, empty - float("inf"), empty, empty, empty, size)
    values = []
    eps, _, _ = plan.softmax
    chunk = max(1, CHUNK_ELEMENTS // Vr)
    for start in range(0, index.numel(), chunk):
        z, _, out, column, own, size = _full_rows(logits, plan, part.exclude, index[start:start + chunk])
        if out is not None:
            z.masked_fill_(out, float("-inf"))
        z_y = torch.where(own, z.gather(1, column.unsqueeze(1)).squeeze(1), 0.0)
        m = z.amax(1)
        s = (z - torch.where(torch.isinf(m), 0.0, m).unsqueeze(1)).exp_().sum(1)
        z_sum = torch.where(torch.isinf(z), 0.0, z).sum(1) if eps else torch.zeros_like(m)
        values.append((m, s, z_y, z_sum, size))
    return Local(index, *(torch.cat(v) for v in zip(*values)))


def _global_size(plan: Plan, part: SupportPart, index: Tensor) -> Tensor:
    """A full part's support size at positions ``index``, from its global exclusion lists alone."""
    size = torch.full((index.numel(),), float(plan.shard.vocab_size), device=index.device)  # type: ignore[union-attr]
    if part.exclude is None or index.numel() == 0:
        return size
    N = plan.labels.shape[1]
    b, n = index // N, index % N
    ex = part.exclude[plan.list_of(b, n)]
    return size - ((ex >= 0) & (ex != plan.labels[b, n].unsqueeze(1))).sum(1)


def _list_candidates(logits: Tensor, plan: Plan, part: SupportPart, index: Tensor):
    """The candidates (P, K+1) of positions ``index`` (label last), which count, which this rank holds."""
    B, N, Vr = logits.shape
    shard = plan.shard
    assert part.ids is not None and shard is not None
    ids = part.ids
    per_position = ids[:, 0][plan.sequence] if ids.shape[1] == 1 and plan.sequence is not None else ids
    cand, valid = candidates(per_position.expand(B, N, ids.shape[-1]), plan.labels.unsqueeze(-1), part.positions)
    K1 = cand.shape[-1]
    cand, valid = cand.reshape(B * N, K1)[index], valid.reshape(B * N, K1)[index]
    here = valid & (cand >= shard.start) & (cand < shard.stop)
    return cand, valid, here


def _list_rows(logits: Tensor, plan: Plan, part: SupportPart, index: Tensor):
    """Capped candidate logits (P, K+1), -inf where not this rank's, the slope, and the candidates."""
    Vr = logits.shape[-1]
    cand, valid, here = _list_candidates(logits, plan, part, index)
    column = (cand - plan.shard.start).clamp(0, max(Vr - 1, 0))     # type: ignore[union-attr]
    if Vr:
        z = logits.reshape(-1, Vr)[index.unsqueeze(1), column].float()  # (P, K+1), a new tensor
    else:
        z = torch.zeros(cand.shape, device=cand.device)
    slope = _capped(z, plan.softmax)
    return z.masked_fill(~here, float("-inf")), slope, column, valid, here


def _list_local(logits: Tensor, plan: Plan, part: SupportPart) -> Local:
    index = part.positions.reshape(-1).nonzero().squeeze(1)
    z, _, _, valid, here = _list_rows(logits, plan, part, index)
    m = z.amax(1)
    s = (z - torch.where(torch.isinf(m), 0.0, m).unsqueeze(1)).exp().sum(1)
    z_y = torch.where(here[:, -1], z[:, -1], 0.0)
    z_sum = torch.where(here, z, 0.0).sum(1)
    return Local(index, m, s, z_y, z_sum, valid.sum(1).float())


def _combine(locals_: list[Local], plan: Plan) -> list[tuple[Tensor, Tensor]]:
    """[(lse, terms)] per part, the same on every rank, from two all-reduces over all parts at once."""
    group = plan.shard.group                                           # type: ignore[union-attr]
    eps, zeta, _ = plan.softmax
    counts = [part.at.numel() for part in locals_]
    m = torch.cat([part.m for part in locals_])
    M = collectives.max_(m.clone(), group)
    rows = [torch.cat([part.s for part in locals_]) * (m - M).exp().nan_to_num(0.0),
            torch.cat([part.z_y for part in locals_])]
    if eps:
        rows.append(torch.cat([part.z_sum for part in locals_]))
    sums = collectives.sum_(torch.stack(rows), group)
    lse = M + sums[0].log()
    size = torch.cat([part.size for part in locals_])
    loss = lse - (1 - eps) * sums[1] - (eps * sums[2] / size if eps else 0.0)
    if zeta:
        loss = loss + zeta * lse * lse
    return list(zip(lse.split(counts), loss.split(counts)))


def _full_grad(logits: Tensor, plan: Plan, part: SupportPart, local: Local, lse: Tensor, weight: Tensor,
               grad: Tensor) -> None:
    """Add the gradient of Σ weight·loss over the part's positions to ``grad`` (B·N, V/R)."""
    eps, zeta, _ = plan.softmax
    Vr = logits.shape[-1]
    chunk = max(1, CHUNK_ELEMENTS // max(Vr, 1))
    for start in range(0, local.at.numel() if Vr else 0, chunk):
        idx, rows = local.at[start:start + chunk], slice(start, start + chunk)
        z, slope, out, column, own, size = _full_rows(logits, plan, part.exclude, idx)
        w, l_ = weight[rows].unsqueeze(1), lse[rows].unsqueeze(1)
        g = (z - l_).exp_().mul_(w * (1 + 2 * zeta * l_) if zeta else w)
        if eps:
            g.sub_(w * eps / size.unsqueeze(1))
        if out is not None:
            g.masked_fill_(out, 0.0)
        g.scatter_add_(1, column.unsqueeze(1), torch.where(own.unsqueeze(1), -w * (1 - eps), 0.0))
        if slope is not None:
            g.mul_(slope)
        grad.index_add_(0, idx, g.to(grad.dtype))


def _list_grad(logits: Tensor, plan: Plan, part: SupportPart, local: Local, lse: Tensor, weight: Tensor,
               grad: Tensor) -> None:
    eps, zeta, _ = plan.softmax
    z, slope, column, valid, here = _list_rows(logits, plan, part, local.at)
    w, l_ = weight.unsqueeze(1), lse.unsqueeze(1)
    g = (z - l_).exp() * (w * (1 + 2 * zeta * l_) if zeta else w)    # 0 where not this rank's
    if eps:
        g = g - (w * eps / local.size.unsqueeze(1)) * here
    g[:, -1] -= torch.where(here[:, -1], w[:, 0] * (1 - eps), 0.0)
    if slope is not None:
        g = g * slope
    if grad.shape[-1]:  # g is 0 where the candidate is not this rank's (its clamped column gets 0 added)
        grad.index_put_((local.at.unsqueeze(1).expand_as(column), column), g.to(grad.dtype), accumulate=True)


def _predicted(logits: Tensor, plan: Plan, sums: PositionSums) -> None:
    """The argmax over the whole vocabulary at supervised positions: the local best, then the best
    value's smallest id over the group (torch's argmax takes the first)."""
    shard = plan.shard
    assert shard is not None
    B, N, Vr = logits.shape
    index = plan.target_mask.reshape(-1).nonzero().squeeze(1)
    value = torch.full((index.numel(),), float("-inf"), device=logits.device)
    best = torch.full((index.numel(),), shard.vocab_size, dtype=torch.long, device=logits.device)
    chunk = max(1, CHUNK_ELEMENTS // max(Vr, 1))
    for start in range(0, index.numel() if Vr else 0, chunk):
        idx = index[start:start + chunk]
        z = logits[idx // N, idx % N].float()
        _capped(z, plan.softmax)
        local_best = z.max(1)
        value[start:start + chunk], best[start:start + chunk] = local_best.values, local_best.indices + shard.start
    top = collectives.max_(value.clone(), shard.group)
    best = collectives.min_(torch.where(value == top, best, torch.full_like(best, shard.vocab_size)), shard.group)
    sums.set_predicted(index, best)


def forward(inputs: Inputs, plan: Plan, need: Need, dtype: torch.dtype) -> EngineOutput:
    """Per-position losses (B, N) fp32, the same on every rank, and this rank's columns of the gradient."""
    logits = inputs[0]
    shard = plan.shard
    assert shard is not None, "the vocabulary-parallel engine needs plan.shard"
    B, N, Vr = logits.shape
    collectives.check_same([plan.labels] + [part.ids for part in plan.parts if part.ids is not None], shard.group,
                           "the labels or the candidate ids (every rank of a vocabulary-parallel group scores the "
                           "same batch: random_subset draws from each rank's generator, so seed it, or the global "
                           "RNG, the same on every rank; a weight that FSDP shards is a DTensor split over ranks "
                           "with different batches, not a vocabulary shard: read it inside the forward of the "
                           "module FSDP wraps it in, where it is whole)")
    locals_ = [_full_local(logits, plan, part) if part.ids is None else _list_local(logits, plan, part)
               for part in plan.parts]
    sums = PositionSums(B * N, logits.device, plan.stats)
    grad = zeros((B * N, Vr), logits.dtype, logits.device) if need[0] else None
    if locals_:
        for part, local, (lse, loss) in zip(plan.parts, locals_, _combine(locals_, plan)):
            _, zeta, _ = plan.softmax
            z_term = zeta * lse * lse if zeta else None
            sums.add(local.at, part.alpha, TokenTerms(loss, z_term))
            if grad is None:
                continue
            weight = part.alpha * plan.coef.reshape(-1)[local.at]
            (_full_grad if part.ids is None else _list_grad)(logits, plan, part, local, lse, weight, grad)
    if plan.stats:
        _predicted(logits, plan, sums)
    return EngineOutput(sums.loss.view(B, N), (None if grad is None else grad.view(B, N, Vr), None, None),
                        None if sums.z_part is None else sums.z_part.view(B, N),
                        None if sums.predicted is None else sums.predicted.view(B, N))


def engine() -> Engine:
    """This engine: row-wise (its gradient rows are the local logits')."""
    return Engine(forward, None, rowwise=True)
