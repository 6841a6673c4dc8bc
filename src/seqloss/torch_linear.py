"""The torch engine of the fused LM head: every objective from hidden states and the head weight,
without (B, N, V) logits.

* List parts (SMILE, random subsetting, ``subset(include=)``) need only K columns of the head:
  the rows ``weight[ids]`` are gathered per group of positions sharing a list (a row of the batch,
  or a single position) and multiplied in a batched matmul — K/V of the FLOPs and memory. The
  weight gradient is scattered back with ``index_add_``.
* Full parts (MLE, reverse subsets, selective EOS, ``exclude``, SMILE's first token) run over
  chunks of the positions with a target: chunk logits ``h_c @ W.T`` into one reused buffer, the
  shared per-position math of ``token_math.py``, then the gradients ``G @ W`` and ``G.T @ h_c`` in the same
  loop (6·N·H·V FLOPs, no recomputation).

The head runs in the call's compute dtype (autocast's, or the widest of the inputs'); the
gradients accumulate in fp32 and come back in each input's dtype. With ``plan.stats`` the full parts
hand back each position's argmax; the positions only list parts score get one more pass of the
head over them, without gradients.

Engine contract: see ``plan.Engine`` (``inputs`` = (hidden (B, N, H), weight (V, H), bias (V,) | None)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._buffers import Grads, GradTriple, in_compute_dtype, workspace
from .plan import Engine, EngineOutput, Inputs, Need, Plan, sequence_groups
from .token_math import PositionSums, candidate_support, candidates, capped_argmax, full_support

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
               exclude: Optional[Tensor], positions: Tensor, w_all: Optional[Tensor], sums: PositionSums,
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
        ex = None if exclude is None else exclude[plan.list_of(b, n)]  # (C, K)
        w = None if w_all is None else alpha * w_all[b, n].unsqueeze(1)
        terms = full_support(z, plan.labels[b, n].unsqueeze(1), ex, w, plan.softmax, predict=plan.stats)
        sums.add(idx, alpha, terms)                                    # z is now dloss/dlogits
        if w is not None:
            grads.add_dense(idx, z, h, weight)


def _groups(ids: Tensor, hidden: Tensor, plan: Plan, positions: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Positions grouped by the list they share → ids (G, K), the flat index of each group's
    positions (G, M) (-1: an empty slot), and whether the groups are the batch's rows in order
    (then blocks are slices of the batch).

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
               positions: Tensor, w_all: Optional[Tensor], sums: PositionSums, grads: Grads) -> None:
    """Positions whose support is the label plus ``ids``: gathered head rows, batched matmuls."""
    H = hidden.shape[-1]
    ids_g, slots, batch_rows = _groups(ids, hidden, plan, positions)
    G, K = ids_g.shape
    h_flat, y_flat, on_flat = hidden.reshape(-1, H), plan.labels.reshape(-1), positions.reshape(-1)
    s = 0
    while s < G:
        M = slots.shape[1] if batch_rows else max(1, int((slots[s] >= 0).sum()))  # the block's longest group
        block = max(1, LIST_BLOCK_ELEMENTS // max(1, (K + M) * H))
        sl = slice(s, s + block)
        s += block
        if batch_rows:  # slices of the batch, no copies
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
        w = None if w_g is None else alpha * w_g.unsqueeze(-1)
        terms, g = candidate_support(z, valid, w, plan.softmax)        # (g, M, 1), (g, M, K+1)
        sums.add(flat.flatten(), alpha, terms)
        if g is None:
            continue
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


def _predict_rest(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, sums: PositionSums) -> None:
    """The argmax of the supervised positions no full part visited: one pass of the head over them."""
    H, V = hidden.shape[-1], weight.shape[0]
    rest = sums.unpredicted(plan.target_mask)
    chunk = max(1, FUSED_CHUNK_ELEMENTS // V)
    for start in range(0, rest.numel(), chunk):
        idx = rest[start:start + chunk]
        z = torch.nn.functional.linear(hidden.reshape(-1, H)[idx], weight, bias).float()
        sums.set_predicted(idx, capped_argmax(z, plan.softmax))


def forward(inputs: Inputs, plan: Plan, need: Need, dtype: torch.dtype,
            weights: Optional[Tensor] = None) -> EngineOutput:
    """Per-position losses (B, N) and the gradients ``need`` asks for: of Σ coef·loss, or of
    Σ weights·loss when ``weights`` (B, N) are given (backward's recompute)."""
    hidden, weight, bias = in_compute_dtype(inputs, dtype)
    assert weight is not None
    B, N, H = hidden.shape
    V = weight.shape[0]
    w_all = weights if weights is not None else plan.coef if any(need) else None
    grads = Grads.allocate(B * N, H, V, hidden.device, w_all is not None, need)
    sums = PositionSums(B * N, hidden.device, plan.stats)
    for part in plan.parts:
        if part.ids is None:
            _full_part(hidden, weight, bias, plan, part.alpha, part.exclude, part.positions, w_all, sums, grads)
        else:
            _list_part(hidden, weight, bias, plan, part.alpha, part.ids, part.positions, w_all, sums, grads)
    if grads.want_weight:  # allocated here when nothing was supervised
        grads.weight_buffer(hidden.device)
    if plan.stats:
        _predict_rest(hidden, weight, bias, plan, sums)
    return EngineOutput(sums.loss.view(B, N), grads.results(inputs),
                        None if sums.z_part is None else sums.z_part.view(B, N),
                        None if sums.predicted is None else sums.predicted.view(B, N))


def backward(inputs: Inputs, plan: Plan, weights: Tensor, need: Need, dtype: torch.dtype) -> GradTriple:
    """The gradients of Σ weights·loss, recomputed (per-position outputs learn their weights only here)."""
    return forward(inputs, plan, need, dtype, weights).grads


def engine() -> Engine:
    """This engine: scalar outputs get their gradients in forward, per-position ones recompute."""
    return Engine(forward, backward, rowwise=False)
