"""The torch engine of the fused LM head: every objective from hidden states and the head weight,
without (B, N, V) logits.

* List parts (SMILE, random subsetting, ``subset(include=)``) need only K columns of the head:
  the rows ``weight[ids]`` are gathered per group of positions sharing a list (a row of the batch,
  or a single position) and multiplied in a batched matmul — K/V of the FLOPs and memory. The
  weight gradient is scattered back with ``index_add_``.
* Full parts (MLE, reverse subsets, selective EOS, ``exclude``, SMILE's first token) run over
  chunks of the positions with a target: chunk logits ``h_c @ W.T`` into one reused buffer, the
  shared per-row math of ``rows.py``, then the gradients ``G @ W`` and ``G.T @ h_c`` in the same
  loop (6·N·H·V FLOPs, no recomputation).

Engine contract (shared with ``kernels.engine.linear_forward``):
``linear_forward(hidden (B, N, H), weight (V, H), bias (V,) | None, plan, w_all, need)`` — hidden,
weight and bias in one dtype — → per-position losses (B, N) fp32 and, when ``w_all`` (B, N) is
given, fp32 accumulators (:class:`~seqloss._buffers.Grads`) of the gradients of Σ w·loss that
``need`` (hidden, weight, bias) asks for.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._buffers import Grads, workspace
from .plan import Plan, sequence_groups
from .rows import candidates, cap_, full_rows, list_rows

# Positions per chunk of the full-vocabulary pass: about this many fp32 logits (1 << 25 = 128 MiB),
# but never fewer than MIN_CHUNK_POSITIONS positions, so that the chunk matmuls stay efficient and
# the weight gradient (V × H) is swept few times.
FUSED_CHUNK_ELEMENTS = 1 << 25
MIN_CHUNK_POSITIONS = 256
# Gathered head rows per block of the list pass (groups × (K + M) × H elements).
LIST_BLOCK_ELEMENTS = 1 << 24


def _product(a: Tensor, b: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """``out`` (fp32) ← a @ b + bias, with no temporary when the inputs are fp32."""
    if a.dtype != torch.float32:
        return out.copy_(a @ b if bias is None else torch.addmm(bias, a, b))
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], buffer: Tensor) -> Tensor:
    """Chunk logits ``h @ weight.T + bias`` (C, V) fp32, written into ``buffer`` (no fresh tensor to fault in).

    A chunk of fewer than MIN_CHUNK_POSITIONS positions (SMILE's first tokens, a remainder) is
    computed as ``weight @ h.T`` into a (V, C) layout and returned transposed: that product streams
    the weight once, ~3× faster for a few positions. Larger chunks keep the row layout, in which
    the row math is fastest. Both gradient products take either layout as it is.
    """
    C, V = h.shape[0], weight.shape[0]
    if C < MIN_CHUNK_POSITIONS:
        col_bias = None if bias is None else bias.unsqueeze(1)
        return _product(weight, h.t(), col_bias, buffer[:V * C].view(V, C)).t()
    return _product(h, weight.t(), bias, buffer[:C * V].view(C, V))


def _full_part(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, alpha: float,
               exclude: Optional[Tensor], positions: Tensor, w_all: Optional[Tensor], loss: Tensor,
               grads: Grads) -> None:
    """Positions whose support is every id but ``exclude``: chunked logits, loss and gradients.

    Only the listed positions are visited: a position costs 6·H·V FLOPs, gathering its hidden row
    next to nothing. One buffer holds every chunk's logits, then its gradient.
    """
    B, N, H = hidden.shape
    V = weight.shape[0]
    flat = positions.flatten().nonzero().squeeze(1)
    chunk = max(1, min(flat.numel(), max(MIN_CHUNK_POSITIONS, FUSED_CHUNK_ELEMENTS // V)))
    buffer = workspace((chunk * V,), torch.float32, hidden.device)[0]  # kept for the next call: no page faults
    h_all = hidden.reshape(B * N, H)
    for start in range(0, flat.numel(), chunk):
        idx = flat[start:start + chunk]
        b, n = idx // N, idx % N
        h = h_all[idx]                                                 # (C, H)
        z = _logits(h, weight, bias, buffer)                           # (C, V) fp32
        capped = None if plan.softcap is None else cap_(z, plan.softcap)
        y = plan.labels[b, n].unsqueeze(1)
        ex = None if exclude is None else exclude[b, n] if exclude.shape[1] > 1 else exclude[plan.list_of(b, n), 0]
        w = None if w_all is None else alpha * w_all[b, n].unsqueeze(1)
        tok = full_rows(z, y, ex, plan.label_smoothing, w, plan.z_loss)  # z becomes dloss/dlogits
        loss.view(-1).index_add_(0, idx, alpha * tok.squeeze(1))
        if w is not None:
            if capped is not None:
                z.mul_(capped)                                         # through the cap: · (1 - tanh²)
            grads.add_dense(idx, z, h, weight)


def _groups(ids: Tensor, hidden: Tensor, plan: Plan, positions: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Positions grouped by the list they share → ids (G, K), the flat index of each group's
    positions (G, M) (-1: an empty slot), and whether the groups are the batch's rows in order.

    Groups are the rows of the batch for (B, 1, K) lists, single positions for (B, N, K) lists, and
    for (S, 1, K) lists (packed examples, turns) the listed positions of each sequence, left-aligned
    and ordered longest first, sequences with none left out: a block of neighbours then pads to its
    own longest sequence, never to the batch's, so skewed lengths or many padding "sequences" cost
    no memory (the gathers happen per block)."""
    B, N, _ = hidden.shape
    if ids.shape[1] == 1 and plan.sequence is not None:
        slots = sequence_groups(plan.sequence, positions, ids.shape[0])  # (S, M), -1 = empty
        filled = (slots >= 0).sum(dim=1)
        order = filled.argsort(descending=True, stable=True)
        order = order[filled[order] > 0]
        return ids[order, 0], slots[order], False
    index = torch.arange(B * N, device=hidden.device).reshape(B, N)
    if ids.shape[1] == 1:
        return ids[:, 0], index, True
    return ids.reshape(B * N, ids.shape[-1]), index.reshape(B * N, 1), False


def _list_part(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, alpha: float, ids: Tensor,
               positions: Tensor, w_all: Optional[Tensor], loss: Tensor, grads: Grads) -> None:
    """Positions whose support is the label plus ``ids``: gathered head rows, batched matmuls."""
    H = hidden.shape[-1]
    ids_g, slots, rows = _groups(ids, hidden, plan, positions)
    G, K = ids_g.shape
    h_flat, y_flat, on_flat = hidden.reshape(-1, H), plan.labels.reshape(-1), positions.reshape(-1)
    s = 0
    while s < G:
        M = slots.shape[1] if rows else max(1, int((slots[s] >= 0).sum()))  # the block's longest group
        block = max(1, LIST_BLOCK_ELEMENTS // max(1, (K + M) * H))
        sl = slice(s, s + block)
        s += block
        if rows:  # slices of the batch, no copies
            h, y, on, flat = hidden[sl].float(), plan.labels[sl].unsqueeze(-1), positions[sl], slots[sl]
            w_g = None if w_all is None else w_all[sl]
        else:
            slot = slots[sl, :M]
            flat = slot.clamp(min=0)
            h, y, on = h_flat[flat].float(), y_flat[flat].unsqueeze(-1), on_flat[flat] & (slot >= 0)
            w_g = None if w_all is None else w_all.reshape(-1)[flat] * on
        cand, valid = candidates(ids_g[sl].unsqueeze(1).expand(-1, M, -1), y, on)  # (g, M, K+1)
        # The list part is small (K columns), so its math is fp32 throughout: bf16 inputs round once.
        w_rows = weight[ids_g[sl].clamp(min=0)].float()                # (g, K, H)
        w_y = weight[y.squeeze(-1)].float()                             # (g, M, H)
        z = torch.cat([torch.bmm(h, w_rows.transpose(1, 2)), (h * w_y).sum(-1, keepdim=True)], dim=-1)
        if bias is not None:
            z = z + bias[cand].float()
        capped = None if plan.softcap is None else cap_(z, plan.softcap)
        w = None if w_g is None else alpha * w_g.unsqueeze(-1)
        tok, g = list_rows(z, valid, plan.label_smoothing, w, plan.z_loss)  # (g, M, 1), (g, M, K+1)
        loss.view(-1).index_add_(0, flat.flatten(), alpha * tok.flatten())
        if g is None:
            continue
        if capped is not None:
            g = g * capped
        g_list, g_y = g[..., :K], g[..., K:]
        if grads.hidden is not None:
            dh = torch.baddbmm(g_y * w_y, g_list, w_rows)               # (g, M, H)
            grads.hidden.index_add_(0, flat.flatten(), dh.reshape(-1, H))
        if grads.want_weight:
            dw_rows = torch.bmm(g_list.transpose(1, 2), h)              # (g, K, H)
            grads.add_weight_rows(ids_g[sl].clamp(min=0).flatten(), dw_rows.reshape(-1, H))
            grads.add_weight_rows(y.flatten(), (g_y * h).reshape(-1, H))
        if grads.bias is not None:
            grads.bias.index_add_(0, cand.flatten(), g.flatten())


def linear_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, w_all: Optional[Tensor],
                  need: tuple[bool, bool, bool]) -> tuple[Tensor, Grads]:
    """Per-position losses (B, N) and, when ``w_all`` (B, N) is given, the gradients of Σ w·loss."""
    B, N, H = hidden.shape
    V = weight.shape[0]
    grads = Grads.allocate(B * N, H, V, hidden.device, w_all is not None, need)
    loss = torch.zeros(B, N, dtype=torch.float32, device=hidden.device)
    for part in plan.parts:
        if part.ids is None:
            _full_part(hidden, weight, bias, plan, part.alpha, part.exclude, part.positions, w_all, loss, grads)
        else:
            _list_part(hidden, weight, bias, plan, part.alpha, part.ids, part.positions, w_all, loss, grads)
    if grads.want_weight:  # allocated here when nothing was supervised
        grads.weight_buffer(hidden.device)
    return loss, grads
