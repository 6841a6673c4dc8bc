"""A full part's split statistics → its losses and its gradient pass's per-slot values, in one launch.

The statistics pass (``support_ce._stats_kernel``) leaves, per split of the columns and per slot, a
running max, Σ exp(z - max), Σ z and the support's size. ``_finish_kernel`` merges the splits
(log-sum-exp) and, for each slot whose position the part scores, adds α × its loss term
lse - (1-ε)·z_y - ε·mean z + ζ·lse² into the per-position sums (and ζ·lse² into the z-loss sums);
with the positions' weights it also writes what the gradient pass reads per slot: lse, the
support's size, the weight α·w (0 where the part does not score) and the softmax's scale
1 + 2ζ·lse. In torch this was some thirty small operations per part, each a launch the host pays
for on a GPU; a slot's position is scored once per part, so the atomic additions add one term each.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..call import SoftmaxOptions
from .parts import Part, interpreting
from .support_ce import NEG


@triton.jit
def _finish_kernel(split_ptr, zy_ptr, rows_ptr, on_ptr, w_ptr, loss_ptr, zpart_ptr, lse_ptr, size_ptr, coef_ptr,
                   pscale_ptr, P, S, alpha, eps, zeta,
                   SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, ZPART: tl.constexpr, WEIGHTS: tl.constexpr,
                   BLOCK: tl.constexpr):
    slot = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_part = slot < P
    row = tl.load(rows_ptr + slot, mask=in_part, other=-1)
    on = (row >= 0) & (tl.load(on_ptr + row, mask=row >= 0, other=0) != 0)
    top = tl.zeros((BLOCK,), dtype=tl.float32) + NEG
    for s in range(0, S):
        top = tl.maximum(top, tl.load(split_ptr + s * P + slot, mask=in_part, other=NEG))
    top = tl.where(in_part, top, 0.0)  # lanes past the part: finite values throughout
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    zsum = tl.zeros((BLOCK,), dtype=tl.float32)
    size = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        m = tl.load(split_ptr + s * P + slot, mask=in_part, other=NEG)
        total += tl.load(split_ptr + (S + s) * P + slot, mask=in_part, other=0.0) * tl.exp(m - top)
        zsum += tl.load(split_ptr + (2 * S + s) * P + slot, mask=in_part, other=0.0)
        size += tl.load(split_ptr + (3 * S + s) * P + slot, mask=in_part, other=0.0)
    lse = top + tl.log(tl.where(in_part, total, 1.0))  # lanes past the part: any finite value
    size = tl.where(in_part, size, 1.0)
    z_y = tl.load(zy_ptr + slot, mask=in_part, other=0.0)
    if SMOOTH:
        tok = lse - (1 - eps) * z_y - eps * zsum / size
    else:
        tok = lse - z_y
    if ZLOSS:
        z_term = zeta * lse * lse
        tok = tok + z_term
        if ZPART:
            tl.atomic_add(zpart_ptr + row, alpha * z_term, mask=on, sem="relaxed")
    tl.atomic_add(loss_ptr + row, alpha * tok, mask=on, sem="relaxed")
    if WEIGHTS:
        w = tl.load(w_ptr + row, mask=on, other=0.0).to(tl.float32)
        tl.store(coef_ptr + slot, alpha * w, mask=in_part)
        tl.store(lse_ptr + slot, lse, mask=in_part)
        tl.store(size_ptr + slot, size, mask=in_part)
        tl.store(pscale_ptr + slot, 1 + 2 * zeta * lse, mask=in_part)  # d(ζ·lse²)/dz = 2ζ·lse·p


class SlotValues(NamedTuple):
    """What the gradient pass reads: per slot (P,) fp32 the lse, the support's size, the weight α·w of
    the slot's loss and the softmax's scale 1 + 2ζ·lse; and the label smoothing ε."""

    lse: Tensor
    size: Tensor
    coef: Tensor
    pscale: Tensor
    eps: float


def finish(split: Tensor, z_y: Tensor, part: Part, alpha: float, softmax: SoftmaxOptions, loss: Tensor,
           z_part: Optional[Tensor], weights: Optional[Tensor]) -> Optional[SlotValues]:
    """Split statistics ``split`` (4, S, P) and label logits ``z_y`` (P,) of ``part``'s slots → α × each
    scored position's loss term added into ``loss`` (B·N,) fp32 (its z-loss term into ``z_part``
    when given); with ``weights`` (B, N) also the gradient pass's ``SlotValues``."""
    eps, zeta = float(softmax.label_smoothing), float(softmax.z_loss)
    S, P = split.shape[1], split.shape[2]
    values = torch.empty(4, P, dtype=torch.float32, device=split.device) if weights is not None else None
    lse, size, coef, pscale = values if values is not None else (loss,) * 4
    block = 32 if interpreting() else 1024
    _finish_kernel[(triton.cdiv(P, block),)](
        split, z_y, part.slots, part.positions.reshape(-1).view(torch.uint8),
        loss if weights is None else weights.reshape(-1), loss,
        loss if z_part is None else z_part, lse, size, coef, pscale, P, S, float(alpha), eps, zeta,
        SMOOTH=eps != 0, ZLOSS=zeta != 0, ZPART=z_part is not None, WEIGHTS=weights is not None, BLOCK=block)
    return None if values is None else SlotValues(lse, size, coef, pscale, eps)
