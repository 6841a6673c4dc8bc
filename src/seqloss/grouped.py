"""List supports on the fused head as grouped matrix products: the part both fused engines share.

SMILE, random and reverse subsets and ``subset(include=)`` score each position's label plus a list
of K ids shared by a group of positions (a row of the batch, a packed example or turn, or a single
position). Only K rows of the head are needed: each group's rows ``weight[ids]`` are gathered once
and multiplied by the group's hidden states in batched matrix products — logits (M, K), then the
gradients ``G @ W_ids`` and ``G.T @ h`` — K/V of the full head's FLOPs and memory, with no atomics
(the weight gradient's rows are added once per group).

Precision: on CPU (and for fp32 inputs) the products run in fp32, so bf16 inputs round once. On a
GPU with bf16/fp16 inputs they run on the tensor cores in the compute dtype with fp32 results where
torch offers them (``out_dtype``), as the dense head's ``F.linear`` would; the softmax math is fp32
either way. Into bf16/fp16 accumulators (the Triton engine's default), and on every GPU, a label that
is one of its list's ids takes its gradient through that id's column, so the weight gradient of a
frequent label is one product's sum, not many rounded additions. On a GPU the lists are padded to a
multiple of 8 ids (aligned products), and the softmax over each position's candidates is a
``CandidateRows``: ``torch_candidate_rows`` here, one Triton kernel in the Triton engine.
"""
from __future__ import annotations

import functools
from typing import Optional, Protocol

import torch
from torch import Tensor

from ._buffers import Grads
from .call import SoftmaxOptions
from .plan import Plan, SupportPart, sequence_groups
from .token_math import PositionSums, candidate_support, candidates

# Gathered head rows per block of groups (groups × (K + M) × H elements).
LIST_BLOCK_ELEMENTS = 1 << 24
LOW_PRECISION = (torch.bfloat16, torch.float16)
# On a GPU the lists are padded to a multiple of this many ids: the products' leading dimensions
# then meet the tensor cores' 16-byte alignment (an odd K falls back to much slower kernels).
GPU_LIST_MULTIPLE = 8


def low_precision_products(x: Tensor) -> bool:
    """Whether the products run in ``x``'s own dtype: bf16/fp16 on a GPU (tensor cores); elsewhere fp32."""
    return x.device.type == "cuda" and x.dtype in LOW_PRECISION


@functools.cache
def _fp32_results(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for ``dtype`` inputs on this device
    (CUDA builds of torch >= 2.8): then low-precision products keep their fp32 accumulators' values."""
    a = torch.zeros(1, 1, 1, dtype=dtype, device=device_type)
    try:
        torch.bmm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def bmm32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (batched) as fp32: fp32 inputs as they are; low-precision ones with fp32 results —
    on the GPU's tensor cores where torch offers them (``out_dtype``); on CPU as the fp32 product of
    the widened inputs, the same values (a product of two bf16/fp16 numbers is exact in fp32); on a
    GPU without them, the product rounded once, then widened."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if a.device.type != "cuda":
        return torch.bmm(a.float(), b.float())
    if _fp32_results(a.device.type, a.dtype):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a, b).float()


def groups(ids: Tensor, hidden: Tensor, plan: Plan, positions: Tensor) -> tuple[Tensor, Tensor, bool, list[int]]:
    """Positions grouped by the list they share → ids (G, K), the flat index of each group's
    positions (G, M) (-1: an empty slot), whether the groups are the batch's rows in order (then
    blocks are slices of the batch), and how many positions each group holds where groups differ
    (sequences; else []).

    Groups are the rows of the batch for (B, 1, K) lists, single positions for (B, N, K) lists, and
    for (S, 1, K) lists (packed examples, turns) the listed positions of each sequence, left-aligned
    and ordered longest first, sequences with none left out: a block of neighbours then pads to its
    own longest sequence, never to the batch's, so skewed lengths or many padding "sequences" cost
    no memory (the gathers happen per block)."""
    B, N, _ = hidden.shape
    if ids.shape[1] == 1 and plan.sequence is not None:
        slots, counts, sizes = sequence_groups(plan.sequence, positions, ids.shape[0])  # (S, M), -1 = empty
        order = counts.argsort(descending=True, stable=True)[:sum(size > 0 for size in sizes)]
        return ids[order, 0], slots[order], False, sorted((size for size in sizes if size > 0), reverse=True)
    index = torch.arange(B * N, device=hidden.device).reshape(B, N)
    if ids.shape[1] == 1:
        return ids[:, 0], index, True, []
    return ids.reshape(B * N, ids.shape[-1]), index.reshape(B * N, 1), False, []


def list_multiple(device: torch.device) -> int:
    """What the lists' length is padded to a multiple of on ``device``."""
    return GPU_LIST_MULTIPLE if device.type == "cuda" else 1


def fold_labels(accumulator: torch.dtype, device: torch.device) -> bool:
    """Whether a label found in its list takes its gradient through that id's column (see
    ``_add_gradients``)."""
    return accumulator != torch.float32 or device.type == "cuda"


def pad_lists(ids: Tensor, multiple: int) -> Tensor:
    """(G, K) PAD-padded lists → (G, K') with K' the next multiple of ``multiple`` (PAD = -1 added)."""
    extra = -ids.shape[1] % multiple
    return ids if extra == 0 else torch.nn.functional.pad(ids, (0, extra), value=-1)


def _label_dots(h: Tensor, w_y: Tensor) -> Tensor:
    """Each position's label logit (g, M, 1) fp32 from its hidden row and its label's head row."""
    if h.dtype == torch.float32:
        return (h * w_y).sum(-1, keepdim=True)
    g, M, H = h.shape
    return bmm32(h.reshape(g * M, 1, H), w_y.reshape(g * M, H, 1)).reshape(g, M, 1)


def _listed_label_logits(z_list: Tensor, listed: Tensor, y: Tensor) -> Tensor:
    """(g, M, 1): each position's label logit read from its list's column (labels listed; 0 where the
    label is not in the list: positions not scored)."""
    return torch.where(listed.unsqueeze(1) == y, z_list, 0.0).sum(-1, keepdim=True)


class CandidateRows(Protocol):
    """The softmax over a block's candidates: ``torch_candidate_rows`` or the Triton engine's kernel."""

    def __call__(self, z_list: Tensor, z_y: Optional[Tensor], listed: Tensor, y: Tensor, on: Tensor,
                 bias: Optional[Tensor], w: Optional[Tensor], softmax: SoftmaxOptions, fold: bool, dtype: torch.dtype,
                 sums: PositionSums, index: Tensor, alpha: float) -> tuple[Optional[Tensor], Optional[Tensor]]: ...


def torch_candidate_rows(z_list: Tensor, z_y: Optional[Tensor], listed: Tensor, y: Tensor, on: Tensor,
                         bias: Optional[Tensor], w: Optional[Tensor], softmax: SoftmaxOptions, fold: bool,
                         dtype: torch.dtype, sums: PositionSums, index: Tensor,
                         alpha: float) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """List logits ``z_list`` (g, M, K) fp32 and label logits ``z_y`` (g, M, 1) of positions ``on``
    (g, M) with labels ``y`` (g, M, 1) and lists ``listed`` (g, K) → α × the terms added into
    ``sums`` at the positions ``index`` (g·M,) and, given the weights ``w`` (g, M, 1), the gradients
    of Σ α·w·loss w.r.t. the list logits (g, M, K), in ``dtype``, and the label logits (g, M, 1) fp32.
    With ``fold`` a label found in its list takes its gradient through that id's column (its label
    gradient is then 0). ``z_y`` None: every scored label is in its list — its logit is read from
    its column, its gradient folded, and no label gradient comes back (None)."""
    M, K = z_list.shape[1], z_list.shape[2]
    cand, valid = candidates(listed.unsqueeze(1).expand(-1, M, -1), y, on)     # (g, M, K+1)
    z = torch.cat([z_list, _listed_label_logits(z_list, listed, y) if z_y is None else z_y], dim=-1)
    if bias is not None:
        z = z + bias[cand].float()
    terms, g = candidate_support(z, valid, None if w is None else alpha * w.float(), softmax)
    sums.add(index, alpha, terms)
    if g is None:
        return None, None
    g_list, g_y = g[..., :K], g[..., K:]
    if fold or z_y is None:
        in_list = (listed.unsqueeze(1) == y) & (listed.unsqueeze(1) >= 0)      # (g, M, K), ids unique
        g_list = g_list + g_y * in_list
        g_y = g_y * ~in_list.any(-1, keepdim=True)                              # labels outside the list
    return g_list.to(dtype), (None if z_y is None else g_y)


def list_part(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, part: SupportPart,
              w_all: Optional[Tensor], sums: PositionSums, grads: Grads, rows: CandidateRows = torch_candidate_rows) -> None:
    """The positions of a list ``part`` (support: the label plus ``part.ids``): losses into ``sums``,
    and (given the weights ``w_all`` (B, N)) the gradients of Σ alpha·w·loss into ``grads``; the
    products in the inputs' dtype where ``low_precision_products`` says so, else in fp32; the softmax
    over each position's candidates by ``rows``. Labels listed (``part.listed``, SMILE's): no label
    rows are gathered, their logits are their columns'."""
    assert part.ids is not None
    H = hidden.shape[-1]
    fast = low_precision_products(hidden)
    ids_g, slots, batch_rows, sizes = groups(part.ids, hidden, plan, part.positions)
    ids_g = pad_lists(ids_g, list_multiple(hidden.device))
    G, K = ids_g.shape
    h_flat, y_flat, on_flat = hidden.reshape(-1, H), plan.labels.reshape(-1), part.positions.reshape(-1)
    fold = fold_labels(grads.dtype, hidden.device)  # listed labels fold whatever it says (see the rows)
    s = 0
    while s < G:
        M = max(1, sizes[s]) if sizes else slots.shape[1]  # the block's longest group
        block = max(1, LIST_BLOCK_ELEMENTS // max(1, (K + M) * H))
        sl = slice(s, s + block)
        s += block
        if batch_rows:  # slices of the batch, no copies
            h, y, on, flat = hidden[sl], plan.labels[sl].unsqueeze(-1), part.positions[sl], slots[sl]
            w_g = None if w_all is None else w_all[sl]
        else:
            slot = slots[sl, :M]
            flat = slot.clamp(min=0)
            h, y, on = h_flat[flat], y_flat[flat].unsqueeze(-1), on_flat[flat] & (slot >= 0)
            w_g = None if w_all is None else w_all.reshape(-1)[flat] * on
        listed = ids_g[sl]
        rows_at = listed.clamp(min=0)
        w_rows = weight[rows_at]                                                # (g, K, H)
        w_y = None if part.listed else weight[y.squeeze(-1)]                    # (g, M, H)
        if not fast:
            h, w_rows = h.float(), w_rows.float()
            w_y = None if w_y is None else w_y.float()
        w = None if w_g is None else w_g.unsqueeze(-1)
        # The bias gradient sums the list gradient unrounded; the products take it in their dtype.
        dtype = torch.float32 if grads.bias is not None else h.dtype
        g_list, g_y = rows(bmm32(h, w_rows.transpose(1, 2)), None if w_y is None else _label_dots(h, w_y), listed, y,
                           on, bias, w, plan.softmax, fold, dtype, sums, flat.flatten(), part.alpha)
        if g_list is not None:
            label = None if g_y is None or w_y is None else (g_y, w_y)
            _add_gradients(g_list, label, rows_at, y, h, w_rows, flat, grads, sl.start * M if batch_rows else None)


def _add_gradients(g_list: Tensor, label: Optional[tuple[Tensor, Tensor]], rows_at: Tensor, y: Tensor, h: Tensor,
                   w_rows: Tensor, flat: Tensor, grads: Grads, first: Optional[int]) -> None:
    """A block's gradients from dloss/dz: ``g_list`` (g, M, K) w.r.t. the list logits of the head's
    rows ``rows_at`` (g, K) (a padding entry's gradient is 0) and, unless labels are listed,
    ``label`` = (g_y (g, M, 1) w.r.t. the label logits, the labels' head rows w_y (g, M, H)).
    ``first``: the block's positions are the hidden rows from there on, in order (slices of the
    batch), else ``flat`` says which they are."""
    H = h.shape[-1]
    g_in = g_list.to(h.dtype)
    if grads.hidden is not None:
        dh = bmm32(g_in, w_rows) if label is None else bmm32(g_in, w_rows) + label[0] * label[1].float()
        if first is None:
            grads.add_hidden_rows(flat.flatten(), dh.reshape(-1, H))
        else:  # a slice of the buffer: no indexed (atomic) additions
            grads.add_hidden_range(first, dh.reshape(-1, H))
    if grads.want_weight:
        dw_rows = bmm32(g_in.transpose(1, 2), h)                                # (g, K, H)
        grads.add_weight_rows(rows_at.flatten(), dw_rows.reshape(-1, H))
        if label is not None:
            # Every label row, those of folded labels with zeros: choosing the others would synchronise
            # with the GPU, which costs more than the additions.
            grads.add_weight_rows(y.flatten(), (label[0] * h.float()).reshape(-1, H))
    if grads.bias is not None:
        listed_at = rows_at.unsqueeze(1).expand_as(g_list)
        grads.bias.index_add_(0, listed_at.flatten(), g_list.float().flatten())
        if label is not None:
            grads.bias.index_add_(0, y.flatten(), label[0].flatten())
