"""The per-position math of a support, written once for the logits path and the fused head.

Both functions take fp32 logits of some positions — a (C, V) chunk of full rows, or the (..., K+1)
candidate logits of list supports — and return each position's loss and the gradient of
Σ w·loss with respect to those logits (w = the position's weight; 0 = no target). With label
smoothing ε the loss is ``lse - (1-ε)·z_y - ε·mean_{v∈S} z_v`` and its gradient on S is
``p_v - (1-ε)·[v = y] - ε/|S|``. A z-loss coefficient ζ adds ``ζ·lse²``, whose gradient
``2ζ·lse·p_v`` scales the softmax term by ``1 + 2ζ·lse``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def full_rows(z: Tensor, y: Tensor, exclude: Optional[Tensor], eps: float, w: Optional[Tensor],
              z_loss: float = 0.0) -> Tensor:
    """Rows whose support is every id but ``exclude`` (C, K; unique ids, < 0 = padding; the label is kept).

    ``z`` (C, V) fp32 is the caller's private copy: it is masked and exponentiated in place and,
    when ``w`` (C, 1) is given, left holding the gradient. Returns the loss (C, 1).
    """
    V = z.shape[1]
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
    if z_loss:
        tok = tok + z_loss * lse * lse
    if w is not None:
        z.mul_(w / s if not z_loss else w * (1 + 2 * z_loss * lse) / s)  # p · w (· (1 + 2ζ·lse))
        if eps:
            z.sub_(w * eps / size)
            if exclude is not None:                                    # excluded ids get no gradient
                g_y = z.gather(1, y)
                z.scatter_(1, exclude, 0.0).scatter_(1, y, g_y)
        z.scatter_add_(1, y, -w * (1 - eps))
    return tok


def cap_(z: Tensor, softcap: float) -> Tensor:
    """Soft-cap fp32 logits in place, z ← c·tanh(z / c) (Gemma 2's ``final_logit_softcapping``), and
    return the cap's derivative 1 - tanh², by which a gradient w.r.t. the capped logits is multiplied."""
    t = torch.tanh(z / softcap)
    z.copy_(t).mul_(softcap)
    return t.mul_(t).neg_().add_(1.0)


def candidates(ids: Tensor, y: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Candidate ids (..., K+1) with the label last, and which of them count.

    ``ids`` (..., K) PAD-padded and unique, ``y`` (..., 1), ``positions`` (...) bool. A list entry
    equal to the label is dropped (the label slot holds it), so no id is counted twice.
    """
    cand = torch.cat([ids.clamp(min=0), y], dim=-1)
    valid = torch.cat([(ids >= 0) & (ids != y), torch.ones_like(y, dtype=torch.bool)], dim=-1)
    return cand, valid & positions.unsqueeze(-1)


def list_rows(z: Tensor, valid: Tensor, eps: float, w: Optional[Tensor],
              z_loss: float = 0.0) -> tuple[Tensor, Optional[Tensor]]:
    """Candidate logits ``z`` (..., K+1) fp32, label last → loss (..., 1) and, given ``w`` (..., 1),
    the gradient (..., K+1) of Σ w·loss (0 at invalid candidates)."""
    K = z.shape[-1] - 1
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
    if z_loss:
        tok = tok + z_loss * lse * lse
    tok = torch.where(valid[..., K:], tok, 0.0)
    if w is None:
        return tok, None
    w = w * valid[..., K:]                                              # inactive positions: no gradient
    g = e * (w / s if not z_loss else w * (1 + 2 * z_loss * lse) / s)
    if eps:
        g = g - (w * eps / size) * valid
    g[..., K:] -= w * (1 - eps)
    return tok, g
