"""Triton kernels of support cross-entropy, one family for the logits path and the fused head.

A launch covers one *part* of a support rule (see ``parts.py``): G groups of M slots, each slot a
flat position (or -1), and the columns every slot of a group scores — all V ids (``LIST=False``,
minus the ids set in an exclusion bitmap when ``EXCLUDE``) or a gathered id list (``LIST=True``).
The label is never one of the columns: every slot starts its statistics from its label's logit,
so a label is counted once whatever the lists hold.

* ``_stats_kernel`` — one pass of online log-sum-exp over a slot's columns (split over ``S``
  programs for parallelism; ``finish.py`` merges the splits), with the sums label smoothing
  needs and, with ``ARGMAX`` (statistics asked for), the running argmax over every column — excluded
  ids and the label included. Logits come from memory (``FUSED=False``) or from
  ``hidden @ weight[cols].T`` tiles.
* ``_grad_kernel`` — the gradient of Σ w·loss on the columns, written once: into the logits'
  gradient, or (fused) recomputing the tile and adding ``g @ W`` and ``g.T @ h`` with atomics in the
  accumulators' dtype (fp32, or bf16/fp16 without ``exact_accumulation``).
* ``_label_grad_kernel`` — the label's own gradient term, per slot.

All math is fp32 whatever the input dtype. ``UPCAST`` (set under ``TRITON_INTERPRET=1``) feeds
``tl.dot`` fp32 operands: the interpreter mis-computes low-precision dots. ``SOFTCAP`` caps each
tile logit to cap·tanh(z / cap) as it is read or made, and the gradient passes multiply by the
cap's derivative; each slot's ``pscale`` multiplies its softmax term (1 + 2ζ·lse under a z-loss ζ).
"""
from __future__ import annotations

import triton
import triton.language as tl

# A finite "minus infinity" for running maxima (empty blocks never give inf - inf); constexpr, since
# compiled kernels may read no other kind of global.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def soft_cap(z, cap):
    """cap·tanh(z / cap), written with a sigmoid (tanh = 2σ(2x) - 1)."""
    return cap * (2.0 * tl.sigmoid(2.0 * z / cap) - 1.0)


@triton.jit
def _accumulate(ptr, value, mask, RMW: tl.constexpr):
    """``*ptr += value`` (fp32 ``value``) in the buffer's dtype: an atomic add (fp32, or bf16/fp16 on
    sm_90), or with ``RMW`` a load, add and store — under the interpreter, whose programs run one
    after another and whose atomics take no bf16."""
    if RMW:
        old = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (old + value).to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptr, value.to(ptr.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _slots(rows_ptr, labels_ptr, brows_ptr, M, EXCLUDE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The slots of one program (group × block of slots, flattened in grid axis 0, so that no axis
    exceeds CUDA's 65535 limit of the other two): in-group flag, slot index, position (-1 = none),
    label, bitmap row."""
    m_blocks = tl.cdiv(M, BLOCK_M)
    g = tl.program_id(0) // m_blocks
    mb = tl.program_id(0) % m_blocks
    m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = g * M + m
    row = tl.load(rows_ptr + slot, mask=m < M, other=-1)
    ok = row >= 0
    y = tl.load(labels_ptr + row, mask=ok, other=0)
    brow = row
    if EXCLUDE:
        brow = tl.load(brows_ptr + slot, mask=ok, other=0)
    return g, m < M, slot, row, y, brow


@triton.jit
def _columns(cols_ptr, bitmap_ptr, g, c0, C, V, row, y, brow,
             LIST: tl.constexpr, EXCLUDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """One block of column ids (-1 = none) and, per slot, which of them count (never the label)."""
    offs = c0 + tl.arange(0, BLOCK_C)
    if LIST:
        col = tl.load(cols_ptr + g * C + offs, mask=offs < C, other=-1)
    else:
        col = tl.where(offs < C, offs, -1)
    valid = (row[:, None] >= 0) & (col[None, :] >= 0) & (col[None, :] != y[:, None])
    if EXCLUDE:
        hit = tl.load(bitmap_ptr + brow[:, None] * V + col[None, :], mask=valid, other=0)
        valid = valid & (hit == 0)
    return col, valid


@triton.jit
def _tile(x_ptr, w_ptr, b_ptr, row, col, H, stride_x, stride_w, cap,
          FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 (capped) logits of a (slots × columns) tile, every column that exists (excluded ids and
    the label included), -inf where the slot or the column does not exist."""
    exists = (row[:, None] >= 0) & (col[None, :] >= 0)
    if FUSED:
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            a = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_x + hh[None, :],
                        mask=(row[:, None] >= 0) & (hh[None, :] < H), other=0.0)
            b = tl.load(w_ptr + col[None, :].to(tl.int64) * stride_w + hh[:, None],
                        mask=(col[None, :] >= 0) & (hh[:, None] < H), other=0.0)
            acc = _dot(a, b, acc, UPCAST, PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + col, mask=col >= 0, other=0.0).to(tl.float32)[None, :]
        z = acc
        if SOFTCAP:
            z = soft_cap(z, cap)
    else:
        z = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_x + col[None, :], mask=exists, other=0.0)
        z = z.to(tl.float32)
        if SOFTCAP:
            z = soft_cap(z, cap)
    return tl.where(exists, z, float("-inf"))


@triton.jit
def _label_logit(x_ptr, w_ptr, b_ptr, row, y, H, stride_x, stride_w, cap,
                 FUSED: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """fp32 logit of each slot's label (0 for empty slots)."""
    ok = row >= 0
    if FUSED:
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            mask = ok[:, None] & (hh[None, :] < H)
            a = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_x + hh[None, :], mask=mask, other=0.0)
            b = tl.load(w_ptr + y[:, None].to(tl.int64) * stride_w + hh[None, :], mask=mask, other=0.0)
            acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + y, mask=ok, other=0.0).to(tl.float32)
        if SOFTCAP:
            acc = soft_cap(acc, cap)
        return acc
    z_y = tl.load(x_ptr + row.to(tl.int64) * stride_x + y, mask=ok, other=0.0).to(tl.float32)
    if SOFTCAP:
        z_y = soft_cap(z_y, cap)
    return z_y


@triton.jit
def _stats_kernel(x_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, brows_ptr, cols_ptr, bitmap_ptr,
                  max_ptr, sum_ptr, zsum_ptr, size_ptr, zy_ptr, best_ptr, arg_ptr,
                  M, C, V, H, P, stride_x, stride_w, blocks_per_split, cap,
                  LIST: tl.constexpr, EXCLUDE: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ARGMAX: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Per slot and split: running max, Σ exp(z - max), Σ z and the count over the split's columns;
    split 0 also counts the label (and stores its logit). With ``ARGMAX`` (full parts only) also the
    largest logit of the split's columns and its id (the first on ties)."""
    split = tl.program_id(1)
    g, in_group, slot, row, y, brow = _slots(rows_ptr, labels_ptr, brows_ptr, M, EXCLUDE, BLOCK_M)
    z_y = _label_logit(x_ptr, w_ptr, b_ptr, row, y, H, stride_x, stride_w, cap, FUSED, HAS_BIAS, SOFTCAP, BLOCK_M,
                       BLOCK_H)
    first = (split == 0).to(tl.float32)
    m = tl.where(split == 0, z_y, NEG)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32) + first
    zsum = z_y * first
    size = tl.zeros((BLOCK_M,), dtype=tl.float32) + first
    best = tl.zeros((BLOCK_M,), dtype=tl.float32) + NEG
    arg = tl.zeros((BLOCK_M,), dtype=tl.int32)
    c_start = split * blocks_per_split * BLOCK_C
    c_end = tl.minimum(C, c_start + blocks_per_split * BLOCK_C)
    for c0 in range(c_start, c_end, BLOCK_C):
        col, valid = _columns(cols_ptr, bitmap_ptr, g, c0, C, V, row, y, brow, LIST, EXCLUDE, BLOCK_C)
        raw = _tile(x_ptr, w_ptr, b_ptr, row, col, H, stride_x, stride_w, cap,
                    FUSED, HAS_BIAS, SOFTCAP, UPCAST, PRECISION, BLOCK_M, BLOCK_C, BLOCK_H)
        if ARGMAX:  # strictly larger only: an earlier block keeps a tie
            top = tl.max(tl.maximum(raw, NEG), axis=1)
            better = top > best
            arg = tl.where(better, c0 + tl.argmax(tl.maximum(raw, NEG), axis=1, tie_break_left=True), arg)
            best = tl.where(better, top, best)
        z = tl.where(valid, raw, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        zsum += tl.sum(tl.where(valid, z, 0.0), axis=1)
        size += tl.sum(valid.to(tl.float32), axis=1)
        m = m_new
    out = split * P + slot
    tl.store(max_ptr + out, m, mask=in_group)
    tl.store(sum_ptr + out, s, mask=in_group)
    tl.store(zsum_ptr + out, zsum, mask=in_group)
    tl.store(size_ptr + out, size, mask=in_group)
    if ARGMAX:
        tl.store(best_ptr + out, best, mask=in_group)
        tl.store(arg_ptr + out, arg, mask=in_group)
    if split == 0:
        tl.store(zy_ptr + slot, z_y, mask=in_group)


@triton.jit
def _grad_kernel(x_ptr, w_ptr, b_ptr, rows_ptr, labels_ptr, brows_ptr, cols_ptr, bitmap_ptr,
                 coef_ptr, lse_ptr, size_ptr, pscale_ptr, eps, gx_ptr, gw_ptr, gb_ptr,
                 M, C, V, H, stride_x, stride_w, stride_gx, stride_gw, cap,
                 LIST: tl.constexpr, EXCLUDE: tl.constexpr, FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SOFTCAP: tl.constexpr, STORE: tl.constexpr, GRAD_X: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr, FILTER: tl.constexpr, RMW: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, STORE_W: tl.constexpr = False):
    """w·(softmax - ε/|S|) on a tile's columns (0 elsewhere): stored into / added to the logits'
    gradient, or (fused) multiplied into the hidden, weight and bias gradients — unless every
    |softmax - ε/|S|| of the tile is below ``FILTER`` (Cut Cross-Entropy's gradient filter). With
    ``STORE_W`` (one block of slots: each program alone on its columns) the weight gradient's rows
    are written, zeros for a filtered tile, not added: the buffer needs no zeroing."""
    cb = tl.program_id(1)
    g, in_group, slot, row, y, brow = _slots(rows_ptr, labels_ptr, brows_ptr, M, EXCLUDE, BLOCK_M)
    coef = tl.load(coef_ptr + slot, mask=in_group, other=0.0)
    lse = tl.load(lse_ptr + slot, mask=in_group, other=0.0)
    size = tl.load(size_ptr + slot, mask=in_group, other=1.0)
    pscale = tl.load(pscale_ptr + slot, mask=in_group, other=1.0)
    col, valid = _columns(cols_ptr, bitmap_ptr, g, cb * BLOCK_C, C, V, row, y, brow, LIST, EXCLUDE, BLOCK_C)
    z = _tile(x_ptr, w_ptr, b_ptr, row, col, H, stride_x, stride_w, cap,
              FUSED, HAS_BIAS, SOFTCAP, UPCAST, PRECISION, BLOCK_M, BLOCK_C, BLOCK_H)
    pv = tl.where(valid, tl.exp(z - lse[:, None]) * pscale[:, None] - eps / size[:, None], 0.0)
    gz = coef[:, None] * pv
    if SOFTCAP:  # through the cap: d(cap·tanh(x / cap))/dx = 1 - (capped / cap)²
        t = tl.where(valid, z / cap, 0.0)
        gz = gz * (1.0 - t * t)
    if FUSED:
        if tl.max(tl.max(tl.abs(pv), axis=1), axis=0) >= FILTER:
            _add_tile_gradients(x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr, gz, row, col, H, stride_x, stride_w,
                                stride_gx, stride_gw, GRAD_X, GRAD_W, GRAD_B, UPCAST, PRECISION, RMW, STORE_W,
                                BLOCK_M, BLOCK_C, BLOCK_H)
        else:
            if STORE_W:
                for h0 in range(0, H, BLOCK_H):
                    hh = h0 + tl.arange(0, BLOCK_H)
                    tl.store(gw_ptr + col[:, None].to(tl.int64) * stride_gw + hh[None, :],
                             tl.zeros((BLOCK_C, BLOCK_H), dtype=gw_ptr.dtype.element_ty),
                             mask=(col[:, None] >= 0) & (hh[None, :] < H))
    else:
        ptr = gx_ptr + row[:, None].to(tl.int64) * stride_gx + col[None, :]
        mask = (row[:, None] >= 0) & (col[None, :] >= 0)
        if STORE:
            tl.store(ptr, gz.to(gx_ptr.dtype.element_ty), mask=mask)
        else:
            old = tl.load(ptr, mask=mask & valid, other=0.0).to(tl.float32)
            tl.store(ptr, (old + gz).to(gx_ptr.dtype.element_ty), mask=mask & valid)


@triton.jit
def _add_tile_gradients(x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr, gz, row, col, H, stride_x, stride_w,
                        stride_gx, stride_gw, GRAD_X: tl.constexpr, GRAD_W: tl.constexpr, GRAD_B: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, RMW: tl.constexpr, STORE_W: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """hidden grad += gz @ W[col], weight grad[col] += gz.T @ hidden[row] (= with ``STORE_W``), bias
    grad[col] += Σ gz, one block of H at a time, with atomics in the accumulators' dtype (other tiles
    add to the same rows); the bias accumulates in fp32."""
    ok = row >= 0
    gz_in = gz
    if not UPCAST:
        gz_in = gz.to(w_ptr.dtype.element_ty)
    for h0 in range(0, H, BLOCK_H):
        hh = h0 + tl.arange(0, BLOCK_H)
        if GRAD_X:
            wt = tl.load(w_ptr + col[:, None].to(tl.int64) * stride_w + hh[None, :],
                         mask=(col[:, None] >= 0) & (hh[None, :] < H), other=0.0)
            dx = _dot(gz_in, wt, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), UPCAST, PRECISION)
            _accumulate(gx_ptr + row[:, None].to(tl.int64) * stride_gx + hh[None, :], dx,
                        ok[:, None] & (hh[None, :] < H), RMW)
        if GRAD_W:
            xt = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_x + hh[None, :],
                         mask=ok[:, None] & (hh[None, :] < H), other=0.0)
            dw = _dot(tl.trans(gz_in), xt, tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32), UPCAST, PRECISION)
            at = gw_ptr + col[:, None].to(tl.int64) * stride_gw + hh[None, :]
            if STORE_W:
                tl.store(at, dw.to(gw_ptr.dtype.element_ty), mask=(col[:, None] >= 0) & (hh[None, :] < H))
            else:
                _accumulate(at, dw, (col[:, None] >= 0) & (hh[None, :] < H), RMW)
    if GRAD_B:
        tl.atomic_add(gb_ptr + col, tl.sum(gz, axis=0), mask=col >= 0)


@triton.jit
def _label_grad_kernel(x_ptr, w_ptr, rows_ptr, labels_ptr, coef_ptr, lse_ptr, size_ptr, zy_ptr, pscale_ptr, eps,
                       gx_ptr, gw_ptr, gb_ptr, P, H, stride_x, stride_w, stride_gx, stride_gw, cap,
                       FUSED: tl.constexpr, SOFTCAP: tl.constexpr, GRAD_X: tl.constexpr, GRAD_W: tl.constexpr,
                       GRAD_B: tl.constexpr, RMW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """The label's term w·(p_y - ε/|S| - (1 - ε)) of each slot, added after ``_grad_kernel``."""
    slot = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row = tl.load(rows_ptr + slot, mask=slot < P, other=-1)
    ok = row >= 0
    y = tl.load(labels_ptr + row, mask=ok, other=0)
    coef = tl.load(coef_ptr + slot, mask=ok, other=0.0)
    lse = tl.load(lse_ptr + slot, mask=ok, other=0.0)
    size = tl.load(size_ptr + slot, mask=ok, other=1.0)
    z_y = tl.load(zy_ptr + slot, mask=ok, other=0.0)
    pscale = tl.load(pscale_ptr + slot, mask=ok, other=1.0)
    g_y = coef * (tl.exp(z_y - lse) * pscale - eps / size - (1.0 - eps))
    if SOFTCAP:
        g_y = g_y * (1.0 - (z_y / cap) * (z_y / cap))
    if FUSED:
        for h0 in range(0, H, BLOCK_H):
            hh = h0 + tl.arange(0, BLOCK_H)
            mask = ok[:, None] & (hh[None, :] < H)
            if GRAD_X:
                wy = tl.load(w_ptr + y[:, None].to(tl.int64) * stride_w + hh[None, :], mask=mask, other=0.0)
                _accumulate(gx_ptr + row[:, None].to(tl.int64) * stride_gx + hh[None, :],
                            g_y[:, None] * wy.to(tl.float32), mask, RMW)
            if GRAD_W:
                xr = tl.load(x_ptr + row[:, None].to(tl.int64) * stride_x + hh[None, :], mask=mask, other=0.0)
                _accumulate(gw_ptr + y[:, None].to(tl.int64) * stride_gw + hh[None, :],
                            g_y[:, None] * xr.to(tl.float32), mask, RMW)
        if GRAD_B:
            tl.atomic_add(gb_ptr + y, g_y, mask=ok)
    else:
        ptr = gx_ptr + row.to(tl.int64) * stride_gx + y
        old = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        tl.store(ptr, (old + g_y).to(gx_ptr.dtype.element_ty), mask=ok)
