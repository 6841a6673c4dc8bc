"""Permutation language modelling (plm): XLNet's span targets and random factorisation order.

XLNet (Yang et al., 2019, arXiv 1906.08237); the span sampling of Hugging Face's
``DataCollatorForPermutationLanguageModeling``, written here for whole batches at once.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from .._buffers import workspace
from .common import (
    MaskingOutput,
    MaskingScheme,
    check_bool,
    check_int,
    check_probability,
    item_mask,
    last_item_mask,
    positions,
    slot_output,
    some_but_not_all,
    targets_where,
)


def sample_spans(lengths: Tensor, length: int, probability: float, max_span_length: int,
                 generator: Optional[torch.Generator]) -> Tensor:
    """(B, length) bool: XLNet's span targets inside each row's items.

    XLNet walks each row in segments: draw a span length s in [1, max_span_length], reserve a
    context of c = int(s / probability) positions, target s consecutive positions starting at a
    uniform offset in [0, c - s] of the context, move on by c, and stop once past the row's items.
    The segments are drawn here for every row at once: as many per row as could start inside
    ``length``; those starting past a row's items are dropped, exactly as the loop never draws them.
    """
    B, device = lengths.shape[0], lengths.device
    context_of = torch.tensor([int(s / probability) for s in range(max_span_length + 1)], device=device)
    # A context is at least int(1 / probability) >= 1 long, which bounds the segments per row.
    segments = -(-length // int(1 / probability))
    span = torch.randint(1, max_span_length + 1, (B, segments), generator=generator, device=device)
    context = context_of[span]
    u = torch.rand((B, segments), generator=generator, device=device, dtype=torch.float64)
    offset = torch.minimum((u * (context - span + 1)).long(), context - span)
    start = context.cumsum(dim=1) - context + offset  # (B, S): the loop's cur_len + offset
    inside = start < lengths.unsqueeze(1)
    end = torch.minimum(start + span, lengths.unsqueeze(1))
    # Spans never overlap (each stays in its own context), so +1 at each start and -1 at each end,
    # summed left to right, is 1 exactly inside a span. Dropped segments go to the spare column.
    start = torch.where(inside, start, length)
    end = torch.where(inside, end, length)
    edges = torch.zeros((B, length + 1), dtype=torch.long, device=device)
    edges.scatter_add_(1, start, torch.ones_like(start))
    edges.scatter_add_(1, end, -torch.ones_like(end))
    return edges.cumsum(dim=1)[:, :length] > 0


def permutation_mask(query: Tensor, order: Tensor) -> Tensor:
    """XLNet's perm_mask, (B, L, L) float32: 1 where position i may NOT attend to position j, for
    predictions at ``query`` (B, L) bool made in the factorisation ``order``: (B, L) or (1, L)
    integer-valued keys in [0, 2^24), the predictions being made in increasing key order.

    i may not attend to j iff j is a prediction and i is not later than j in the order: a
    prediction sees neither itself nor later predictions (nor one with the same key), every other
    position sees no prediction, and non-predictions are visible to all.
    """
    # One pass writing float32, with no bool intermediate to convert: with integer keys,
    # column_key[j] > row_key[i] exactly where i may not attend to j, and the comparison writes its
    # 0/1 straight into a float32 output (the output is the only (B, L, L) memory touched). Rows of
    # non-predictions take key -1 (before every prediction: column keys are >= 1 there); columns of
    # non-predictions take -1 too (never greater: visible to all).
    rank = order.to(torch.float32)
    row_key = torch.where(query, rank, -1.0)
    column_key = torch.where(query, rank + 1, -1.0)
    B, L = query.shape
    # The output is most of the call's memory (5 MiB at B=512, L=50) and, freshly allocated after
    # other work has freed memory (a training step, a collator's previous batch), its first-touch
    # page faults cost several times the comparison itself. So on CPU it comes from a kept map,
    # reused once no tensor of a previous call holds it (never overwritten while in use).
    out, _ = workspace((B, L, L), torch.float32, query.device)
    return torch.gt(column_key.unsqueeze(1), row_key.unsqueeze(2), out=out)


def identity_mapping(batch_size: int, length: int, device: torch.device) -> Tensor:
    """XLNet's target_mapping with prediction k made at position k for every k: (B, L, L) float32,
    the identity broadcast over the batch (a view; ``.contiguous()`` makes a copy)."""
    return torch.eye(length, device=device).expand(batch_size, length, length)


class PermutationLM(MaskingScheme):
    """Spans of items become targets, predicted in a random factorisation order (XLNet).

    Alignment: a target sits at its own position, ``targets[:, i] = item_ids[:, i]``.
    ``target_mapping`` is the identity (prediction k is made at position k, as in HF's permutation
    collator), so XLNet's outputs line up with ``targets``; positions without a target predict
    too, and their -100 targets drop them from the loss. Inputs are not hidden (``input_mask`` is
    False in train and eval): ``perm_mask`` keeps each target's content out of its own prediction,
    while later targets in the order may still see it, which hiding the input would forbid.

    Modes:
        train: span targets (``probability``, ``max_span_length``); a row that drew none gets one
            random item and a row of >= 2 items that drew all loses one (a 1-item row's item is its
            target). With ``permute_all``, every item is a target (full permutation LM). The order
            is uniformly random per row (i.i.d. keys; targets with equal keys, a chance below
            T^2 / 2^25 per row of T targets, hide from each other).
        eval: the last item of each row of >= 2 items, hidden from every position; with
            ``eval_on_last_item_only=False``, every item with a history (positions 1 .. n_b - 1),
            in the left-to-right order, so each sees exactly the items before it.
        infer: a prediction slot, as in ``MaskedLM``: (B, L + 1) inputs with ``padding_idx`` at
            position n_b of each row (marked in ``input_mask``), hidden from every position; the
            prediction made there is the next item. No targets.

    ``perm_mask`` and ``target_mapping`` are float32 in every mode, as ``XLNetModel`` takes them;
    ``target_mapping`` is a broadcast view of one identity matrix.

    Args:
        padding_idx: the right-padding id.
        eval_on_last_item_only: see eval above.
        probability: the span density, in (0, 1); a span of s items gets a context of
            int(s / probability) positions.
        max_span_length: the longest span, >= 1.
        permute_all: make every item a target in train mode.
    """

    name = "plm"

    def __init__(self, padding_idx: int = 0, eval_on_last_item_only: bool = True, probability: float = 1 / 6,
                 max_span_length: int = 5, permute_all: bool = False) -> None:
        super().__init__(padding_idx, eval_on_last_item_only)
        self.probability = check_probability("probability", probability, open_interval=True)
        self.max_span_length = check_int("max_span_length", max_span_length, minimum=1)
        self.permute_all = check_bool("permute_all", permute_all)

    def _train(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        B, L = item_ids.shape
        if self.permute_all:
            target_mask = item_mask(lengths, L)
        else:
            spans = sample_spans(lengths, L, self.probability, self.max_span_length, generator)
            target_mask = some_but_not_all(spans, lengths, generator)
        # I.i.d. integer keys order the targets uniformly at random without a sort (a sort would
        # take a third of the call); only targets need one, so only they draw (a sixth of the
        # positions at the default rate). Keys stay below 2^24, so float32 holds them and their
        # differences exactly (see permutation_mask); two targets draw the same key with
        # probability below T^2 / 2^25 per row, and are then predicted as one step, each hidden
        # from the other: a weaker order, never a leak.
        keys = torch.randint(2**24, (int(target_mask.count_nonzero()),), generator=generator,
                             device=item_ids.device, dtype=torch.float32)
        order = torch.zeros((B, L), device=item_ids.device).masked_scatter_(target_mask, keys)
        return self._output(item_ids, target_mask, order)

    def _eval(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        L = item_ids.shape[1]
        pos = positions(L, item_ids.device)
        if self.eval_on_last_item_only:
            target_mask = last_item_mask(lengths, L)
        else:
            target_mask = item_mask(lengths, L) & (pos >= 1)
        return self._output(item_ids, target_mask, pos)

    def _infer(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        out = slot_output(item_ids, lengths, self.padding_idx, self.padding_idx)
        B, L1 = out.input_ids.shape
        # Only the slot is a prediction; every position sees every item and none sees the slot.
        return replace(out, perm_mask=permutation_mask(out.input_mask, positions(L1, item_ids.device)),
                       target_mapping=identity_mapping(B, L1, item_ids.device))

    def _output(self, item_ids: Tensor, target_mask: Tensor, order: Tensor) -> MaskingOutput:
        B, L = item_ids.shape
        return MaskingOutput(targets=targets_where(item_ids, target_mask), target_mask=target_mask,
                             input_ids=item_ids.clone(), input_mask=torch.zeros_like(target_mask),
                             perm_mask=permutation_mask(target_mask, order),
                             target_mapping=identity_mapping(B, L, item_ids.device))
