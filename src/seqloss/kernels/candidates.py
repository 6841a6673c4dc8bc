"""The softmax over a list part's candidates in one kernel: what ``grouped.torch_candidate_rows``
computes in some thirty tensor operations, for the Triton engine's list parts.

Each program takes one position: its K list logits (a row of the grouped product ``h @ W_ids.T``)
and its label's logit, adds the bias, soft-caps, adds α × its loss term (and z-loss term) into the
per-position sums, and writes the gradient of α·w·loss w.r.t. the list logits (in the products'
dtype, ready for ``G @ W_ids`` and ``G.T @ h``) and w.r.t. the label's logit — a label found in its list in that id's column when
``fold`` says so. Two passes over the row in blocks of ``BLOCK_K``: an online log-sum-exp, then the
gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..call import SoftmaxOptions
from ..token_math import PositionSums
from .parts import interpreting
from .support_ce import NEG, soft_cap


@triton.jit
def _capped(z, cap, SOFTCAP: tl.constexpr):
    """(capped logits, d capped / dz)."""
    if SOFTCAP:
        capped = soft_cap(z, cap)
        return capped, 1.0 - (capped / cap) * (capped / cap)
    return z, z * 0.0 + 1.0


@triton.jit
def _chunk(zl_ptr, ids_ptr, b_ptr, r, group, k0, K, y, on, cap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
           BLOCK_K: tl.constexpr):
    """Ids k0 … k0 + BLOCK_K of a position's list: the ids, which of them count, their capped logits
    and the cap's derivative."""
    k = k0 + tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + group * K + k, mask=k < K, other=-1)
    valid = (ids >= 0) & (ids != y) & on
    z = tl.load(zl_ptr + r * K + k, mask=k < K, other=0.0)
    if HAS_BIAS:
        z += tl.load(b_ptr + tl.maximum(ids, 0), mask=k < K, other=0.0).to(tl.float32)
    z, slope = _capped(z, cap, SOFTCAP)
    return ids, valid, z, slope


@triton.jit
def _candidate_kernel(zl_ptr, zy_ptr, ids_ptr, y_ptr, on_ptr, b_ptr, w_ptr, index_ptr, loss_ptr, zpart_ptr, gl_ptr,
                      gy_ptr, M, K, alpha, eps, zeta, cap,
                      HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, GRAD: tl.constexpr, FOLD: tl.constexpr,
                      ZPART: tl.constexpr, LISTED: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    group = r // M
    y = tl.load(y_ptr + r)
    on = tl.load(on_ptr + r) != 0
    if LISTED:  # the label's logit is its column's
        zy = tl.sum(tl.zeros((BLOCK_K,), dtype=tl.float32), axis=0)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            ids = tl.load(ids_ptr + group * K + k, mask=k < K, other=-1)
            zy += tl.sum(tl.where(ids == y, tl.load(zl_ptr + r * K + k, mask=k < K, other=0.0), 0.0), axis=0)
    else:
        zy = tl.load(zy_ptr + r)
    if HAS_BIAS:
        zy += tl.load(b_ptr + y).to(tl.float32)
    zy, slope_y = _capped(zy, cap, SOFTCAP)
    m = tl.where(on, zy, NEG)
    s = tl.where(on, 1.0, 0.0)
    zsum = tl.where(on, zy, 0.0)
    size = tl.where(on, 1.0, 0.0)
    found = tl.sum(tl.zeros((BLOCK_K,), dtype=tl.int32), axis=0)
    for k0 in range(0, K, BLOCK_K):
        ids, valid, z, _ = _chunk(zl_ptr, ids_ptr, b_ptr, r, group, k0, K, y, on, cap, HAS_BIAS, SOFTCAP, BLOCK_K)
        zv = tl.where(valid, z, NEG)
        m_new = tl.maximum(m, tl.max(zv, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(valid, tl.exp(zv - m_new), 0.0), axis=0)
        m = m_new
        zsum += tl.sum(tl.where(valid, z, 0.0), axis=0)
        size += tl.sum(valid.to(tl.float32), axis=0)
        found = tl.maximum(found, tl.max(((ids == y) & (ids >= 0)).to(tl.int32), axis=0))
    m = tl.where(m > NEG, m, 0.0)  # a position with nothing to score (not supervised): 0, as in the torch twin
    s = tl.maximum(s, 1.1754943508222875e-38)
    lse = m + tl.log(s)
    size = tl.maximum(size, 1.0)
    tok = lse - (1.0 - eps) * zy - eps * zsum / size
    z_term = zeta * lse * lse
    position = tl.load(index_ptr + r)
    tl.atomic_add(loss_ptr + position, alpha * (tok + z_term), mask=on, sem="relaxed")
    if ZPART:
        tl.atomic_add(zpart_ptr + position, alpha * z_term, mask=on, sem="relaxed")
    if GRAD:
        w = tl.where(on, alpha * tl.load(w_ptr + r), 0.0)
        scale = w * (1.0 + 2.0 * zeta * lse) / s
        smooth = w * eps / size
        g_y = tl.where(on, (tl.exp(tl.where(on, zy, m) - m) * scale - smooth - w * (1.0 - eps)) * slope_y, 0.0)
        for k0 in range(0, K, BLOCK_K):
            ids, valid, z, slope = _chunk(zl_ptr, ids_ptr, b_ptr, r, group, k0, K, y, on, cap, HAS_BIAS, SOFTCAP,
                                          BLOCK_K)
            k = k0 + tl.arange(0, BLOCK_K)
            g = tl.where(valid, (tl.exp(tl.where(valid, z, m) - m) * scale - smooth) * slope, 0.0)
            if FOLD:
                g = tl.where((ids == y) & (ids >= 0), g_y, g)
            tl.store(gl_ptr + r * K + k, g.to(gl_ptr.dtype.element_ty), mask=k < K)
        if FOLD:
            g_y = tl.where(found > 0, 0.0, g_y)
        if not LISTED:
            tl.store(gy_ptr + r, g_y)


def candidate_rows(z_list: Tensor, z_y: Optional[Tensor], listed: Tensor, y: Tensor, on: Tensor,
                   bias: Optional[Tensor], w: Optional[Tensor], softmax: SoftmaxOptions, fold: bool, dtype: torch.dtype,
                   sums: PositionSums, index: Tensor, alpha: float) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The kernel's twin of ``grouped.torch_candidate_rows``: list logits ``z_list`` (g, M, K) fp32,
    label logits ``z_y`` (g, M, 1) (None: labels listed, read from their columns), ``listed`` (g, K)
    ids (PAD -1), ``y`` (g, M, 1), ``on`` (g, M), ``w`` (g, M, 1) or None → α × the terms added into
    ``sums`` at the positions ``index`` (g·M,) and, given ``w``, the gradients of Σ α·w·loss w.r.t.
    the list logits (g, M, K) in ``dtype`` and (unless labels are listed) the label logits (g, M, 1) fp32."""
    g, M, K = z_list.shape
    eps, zeta, cap = softmax  # label smoothing, z-loss, soft cap
    device = z_list.device
    grad = w is not None
    with_label = grad and z_y is not None
    g_list = torch.empty((g, M, K), dtype=dtype, device=device) if grad else sums.loss
    g_y = torch.empty(g * M, dtype=torch.float32, device=device) if with_label else sums.loss
    z_part = sums.z_part if zeta else None
    block = 16 if interpreting() else min(2048, triton.next_power_of_2(max(K, 16)))
    on_flat = on.reshape(-1)
    z_list = z_list.contiguous()
    _candidate_kernel[(g * M,)](
        z_list, z_list if z_y is None else z_y.reshape(-1).contiguous(), listed.contiguous(),
        y.reshape(-1).contiguous(), on_flat.view(torch.uint8) if on_flat.dtype == torch.bool else on_flat,
        sums.loss if bias is None else bias, sums.loss if w is None else w.reshape(-1).contiguous(), index, sums.loss,
        sums.loss if z_part is None else z_part, g_list, g_y, M, K, float(alpha), float(eps), float(zeta),
        float(cap or 1.0), HAS_BIAS=bias is not None, SOFTCAP=bool(cap), GRAD=grad, FOLD=fold or z_y is None,
        ZPART=z_part is not None, LISTED=z_y is None, BLOCK_K=block)
    return (g_list if grad else None), (g_y.view(g, M, 1) if with_label else None)
