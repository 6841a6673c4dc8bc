"""The per-position math of a support, written once for every torch engine.

Both functions take fp32 logits of some positions — a (C, V) chunk of full-vocabulary positions, or
the (..., K+1) candidate logits of list supports — and return each position's loss terms and the
gradient of Σ w·loss with respect to those logits (w = the position's weight; 0 = no target).

With soft-capping c the logits are first capped, z ← c·tanh(z / c), and the gradient is multiplied
by the cap's derivative 1 - tanh². With label smoothing ε the loss is
``lse - (1-ε)·z_y - ε·mean_{v∈S} z_v`` and its gradient on S is ``p_v - (1-ε)·[v = y] - ε/|S|``.
A z-loss coefficient ζ adds ``ζ·lse²``, whose gradient ``2ζ·lse·p_v`` scales the softmax term by
``1 + 2ζ·lse``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .call import SoftmaxOptions


class TokenTerms(NamedTuple):
    """What the math of some positions hands back: each position's loss (..., 1) (z-loss included),
    its z-loss term ζ·lse² (..., 1) when ζ > 0, and its argmax over the scored ids when asked."""

    loss: Tensor
    z_term: Optional[Tensor] = None
    predicted: Optional[Tensor] = None


def cap_(z: Tensor, softcap: float) -> Tensor:
    """Soft-cap fp32 logits in place, z ← c·tanh(z / c) (Gemma 2's ``final_logit_softcapping``), and
    return the cap's derivative 1 - tanh², by which a gradient w.r.t. the capped logits is multiplied."""
    t = torch.tanh(z / softcap)
    z.copy_(t).mul_(softcap)
    return t.mul_(t).neg_().add_(1.0)


def full_support(z: Tensor, y: Tensor, exclude: Optional[Tensor], w: Optional[Tensor], softmax: SoftmaxOptions,
                 predict: bool = False) -> TokenTerms:
    """Positions whose support is every id but ``exclude`` (C, K; unique ids, < 0 = padding; the
    label is kept).

    ``z`` (C, V) fp32 is the caller's private copy: it is capped, masked and exponentiated in place
    and, when ``w`` (C, 1) is given, left holding the gradient. ``predict`` adds each position's
    argmax over all V ids (the capped logits, before the exclusion).
    """
    V = z.shape[1]
    eps, zeta = softmax.label_smoothing, softmax.z_loss
    slope = cap_(z, softmax.softcap) if softmax.softcap else None
    predicted = z.argmax(1) if predict else None
    z_y = z.gather(1, y)                                               # (C, 1)
    size = torch.full_like(z_y, V)
    if exclude is not None:
        drop = (exclude >= 0) & (exclude != y)
        exclude = torch.where(drop, exclude, y)                        # padding → the label, restored below
        size = size - drop.sum(1, keepdim=True)
    if eps:
        z_sum = z.sum(1, keepdim=True)
        if exclude is not None:
            z_sum = z_sum - (z.gather(1, exclude) * drop).sum(1, keepdim=True)
    if exclude is not None:
        z.scatter_(1, exclude, float("-inf")).scatter_(1, y, z_y)
    m = z.amax(1, keepdim=True)
    s = z.sub_(m).exp_().sum(1, keepdim=True)                           # z now holds exp(z - m)
    lse = m + s.log()
    tok = lse - z_y if not eps else lse - (1 - eps) * z_y - eps * z_sum / size
    z_term = zeta * lse * lse if zeta else None
    if z_term is not None:
        tok = tok + z_term
    if w is not None:
        z.mul_(w / s if not zeta else w * (1 + 2 * zeta * lse) / s)    # p · w (· (1 + 2ζ·lse))
        if eps:
            z.sub_(w * eps / size)
            if exclude is not None:                                    # excluded ids get no gradient
                g_y = z.gather(1, y)
                z.scatter_(1, exclude, 0.0).scatter_(1, y, g_y)
        z.scatter_add_(1, y, -w * (1 - eps))
        if slope is not None:
            z.mul_(slope)                                              # through the cap
    return TokenTerms(tok, z_term, predicted)


def capped_argmax(z: Tensor, softmax: SoftmaxOptions) -> Tensor:
    """(C,) argmax over the vocabulary of fp32 logits (C, V), capped first (the caller's private copy)."""
    if softmax.softcap:
        cap_(z, softmax.softcap)
    return z.argmax(1)


def candidates(ids: Tensor, y: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Candidate ids (..., K+1) with the label last, and which of them count.

    ``ids`` (..., K) PAD-padded and unique, ``y`` (..., 1), ``positions`` (...) bool. A list entry
    equal to the label is dropped (the label slot holds it), so no id is counted twice.
    """
    cand = torch.cat([ids.clamp(min=0), y], dim=-1)
    valid = torch.cat([(ids >= 0) & (ids != y), torch.ones_like(y, dtype=torch.bool)], dim=-1)
    return cand, valid & positions.unsqueeze(-1)


def candidate_support(z: Tensor, valid: Tensor, w: Optional[Tensor],
                      softmax: SoftmaxOptions) -> tuple[TokenTerms, Optional[Tensor]]:
    """Candidate logits ``z`` (..., K+1) fp32, label last (a private copy, capped in place) → the
    terms (..., 1) and, given ``w`` (..., 1), the gradient (..., K+1) of Σ w·loss (0 at invalid
    candidates)."""
    K = z.shape[-1] - 1
    eps, zeta = softmax.label_smoothing, softmax.z_loss
    slope = cap_(z, softmax.softcap) if softmax.softcap else None
    z = z.masked_fill(~valid, float("-inf"))
    m = z.amax(-1, keepdim=True).nan_to_num(neginf=0.0)                # positions with nothing valid → 0
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
    active = valid[..., K:]
    z_term = torch.where(active, zeta * lse * lse, 0.0) if zeta else None
    if z_term is not None:
        tok = tok + z_term
    terms = TokenTerms(torch.where(active, tok, 0.0), z_term)
    if w is None:
        return terms, None
    w = w * active                                                      # inactive positions: no gradient
    g = e * (w / s if not zeta else w * (1 + 2 * zeta * lse) / s)
    if eps:
        g = g - (w * eps / size) * valid
    g[..., K:] -= w * (1 - eps)
    return terms, (g if slope is None else g * slope)


class PositionSums:
    """Per-position sums over a plan's parts, flat (B·N,): losses, z-loss terms and argmax ids
    (the last two with ``stats``), with where an argmax has been written."""

    def __init__(self, count: int, device: torch.device, stats: bool) -> None:
        self.loss = torch.zeros(count, dtype=torch.float32, device=device)
        self.z_part = torch.zeros_like(self.loss) if stats else None
        self.predicted = torch.zeros(count, dtype=torch.long, device=device) if stats else None
        self.predicted_at = torch.zeros(count, dtype=torch.bool, device=device) if stats else None

    def add(self, index: Tensor, alpha: float, terms: TokenTerms, on: Optional[Tensor] = None) -> None:
        """Add ``alpha`` × the terms of the positions ``index`` (C,); ``on`` (C,) masks which count."""
        loss = terms.loss.reshape(-1)
        self.loss.index_add_(0, index, alpha * (loss if on is None else torch.where(on, loss, 0.0)))
        if self.z_part is not None and terms.z_term is not None:
            z_term = terms.z_term.reshape(-1)
            self.z_part.index_add_(0, index, alpha * (z_term if on is None else torch.where(on, z_term, 0.0)))
        if terms.predicted is not None:
            self.set_predicted(index if on is None else index[on], terms.predicted if on is None else
                               terms.predicted[on])

    def set_predicted(self, index: Tensor, ids: Tensor) -> None:
        if self.predicted is not None and self.predicted_at is not None:
            self.predicted[index] = ids
            self.predicted_at[index] = True

    def unpredicted(self, target_mask: Tensor) -> Tensor:
        """(R,) the flat supervised positions no part has predicted yet (list supports score K ids)."""
        assert self.predicted_at is not None
        return (target_mask.reshape(-1) & ~self.predicted_at).nonzero().squeeze(1)
