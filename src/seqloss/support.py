"""Labels → supports: shift, first supervised position, row token sets, candidate lists.

Every objective of seqloss is a *support rule*: at position (b, n) the softmax runs over a set
S(b, n) of vocabulary ids that always contains the label y. Two shapes of rule cover them all:

* ``FullSupport`` — all V ids minus an exclusion list (MLE, reverse subsetting, selective EOS,
  ``subset(exclude=...)``). The work is O(V) per position.
* ``ListSupport`` — an explicit candidate list (SMILE, random subsetting,
  ``subset(include=...)``). The work is O(K) per position; positions flagged in
  ``full_positions`` (SMILE's first-token MLE) use all V ids instead.

Lists hold ids sorted (descending) and de-duplicated, with -1 as padding after them, so that an id
is never counted twice in a log-sum-exp. The label itself is *not* stored in a list: the loss adds it
once per position (SMILE's lists do hold every label they score: ``labels_listed``).
Exclusions are always one list per sequence, (L, K); candidates one per sequence, (L, 1, K), or one
per position, (B, N, K) (``subset(include=)`` per label position).

**Sequences.** Everything "per row" (SMILE's and reverse subsetting's token sets, the first
supervised position) is per *sequence*: a batch row, or — with ``position_ids`` (Hugging Face's
padding-free convention) — each packed example of a row, and with ``turns=True`` each maximal run
of supervised positions (a conversation turn). When sequences are not rows, per-row lists are laid
out per sequence, and ``Sequences`` maps each position to its list.
Both the efficient path and the tests build on these structures; the dense spec in
``reference.py`` builds its masks straight from the labels instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .call import Common

PAD = -1  # padding entry of a candidate or exclusion list


@dataclass(frozen=True)
class FullSupport:
    """All V ids minus ``exclude`` (L, K), one list per row or sequence, PAD-padded; the label is never
    excluded."""

    exclude: Optional[Tensor] = None


@dataclass(frozen=True)
class ListSupport:
    """The label plus ``ids`` (L, 1, K) per row or sequence, or (B, N, K) per position, PAD-padded,
    unique along K.

    ``full_positions`` (B, N) bool marks target positions that use every id instead (first-token MLE).
    ``labels_listed``: every label the list scores is one of its list's ids (SMILE's token sets) —
    then the label's logit is its column's, and the label needs no product of its own.
    """

    ids: Tensor
    full_positions: Optional[Tensor] = None
    labels_listed: bool = False


Support = Union[FullSupport, ListSupport]


@dataclass(frozen=True)
class Sequences:
    """The sequences of a (B, N) batch when they are not its rows.

    ``index`` (B, N) long gives each position's sequence in [0, count), non-decreasing in row-major
    order (a sequence is a run of positions inside one row); ``batch_row`` (count,) the row each lies
    in. Under ``torch.compile`` ``count`` is the bound B·N (the true count would be read from the
    data); the spare sequences are empty.
    """

    index: Tensor
    count: int
    batch_row: Tensor


# --- targets -----------------------------------------------------------------------------------


def example_starts(position_ids: Tensor) -> Tensor:
    """(B, N) bool: where a packed example starts — each row's start, and wherever ``position_ids`` do
    not continue the previous position (+1): a restart at 0, or at a collator's ``position_ids_start``.
    This is how transformers finds packed sequences for its attention masks."""
    if not position_ids.shape[-1]:
        return torch.zeros_like(position_ids, dtype=torch.bool)
    continues = position_ids[..., 1:] == position_ids[..., :-1] + 1
    return torch.cat([torch.ones_like(position_ids[..., :1], dtype=torch.bool), ~continues], dim=-1)


def shift_labels(labels: Tensor, shift: bool, ignore_index: int, starts: Optional[Tensor] = None) -> Tensor:
    """Labels aligned with the logits positions that predict them.

    With ``shift=True`` position n is scored against ``labels[..., n + 1]`` and the last position
    has no target (Hugging Face's ``ForCausalLMLoss`` convention), so the result keeps shape N.
    With packed examples (``starts`` from ``example_starts``), the last position of an example
    has no target either: it never predicts the next example's first token.
    """
    if not shift:
        return labels
    if starts is not None:
        labels = torch.where(starts, torch.full_like(labels, ignore_index), labels)
    return shift_values(labels, ignore_index)


def safe_labels(t: Targets, c: Common) -> Tensor:
    """The shifted labels with 0 where there is no target (safe to gather with): valid labels are
    never negative, so a negative ``ignore_index`` (Hugging Face's -100) only needs a clamp."""
    return t.labels.clamp(min=0) if c.ignore_index < 0 else torch.where(t.target_mask, t.labels, 0)


def shift_values(values: Tensor, fill: Union[int, float], dim: int = -1) -> Tensor:
    """Per-label values (..., N, ...) moved to the positions that predict their labels: position n
    gets the value of label n + 1 along ``dim``, the last position ``fill``."""
    dim = dim % values.dim()
    tail = values.narrow(dim, 1, values.shape[dim] - 1) if values.shape[dim] else values
    pad = [0, 0] * (values.dim() - 1 - dim) + [0, 1 if values.shape[dim] else 0]
    return torch.nn.functional.pad(tail, pad, value=fill)


def targets_of(labels: Tensor, c: Common, vocab_size: int) -> Targets:
    """The one targets builder: unshifted labels (B, N) → the shifted labels, their target mask and
    their sequences (packed examples from ``c.position_ids`` (B, N), turns), as every support rule,
    weight and statistic reads them."""
    starts = None if c.position_ids is None else example_starts(c.position_ids)
    shifted = shift_labels(labels.long(), c.shift, c.ignore_index, starts)
    target_mask = shifted != c.ignore_index
    return Targets(shifted, target_mask, vocab_size, c.shift, sequences_of(target_mask, starts, c.turns))


def sequences_of(target_mask: Tensor, starts: Optional[Tensor], turns: bool) -> Optional[Sequences]:
    """The sequences of a batch of shifted targets (B, N): packed examples (``starts``), split further
    into maximal runs of supervised positions with ``turns``; None when they are the rows."""
    if starts is None and not turns:
        return None
    B, N = target_mask.shape
    if starts is None:  # the rows' starts
        starts = torch.zeros_like(target_mask)
        starts[:, :1] = True
    begins = starts
    if turns:
        before = torch.nn.functional.pad(target_mask[:, :-1], (1, 0), value=False)
        begins = begins | (target_mask & ~before)
    flat = begins.reshape(-1)
    index = flat.long().cumsum(0) - 1                                   # ≥ 0: every row starts a sequence
    count = B * N if torch.compiler.is_compiling() else int(flat.sum())
    rows = torch.arange(B * N, device=flat.device) // max(N, 1)
    batch_row = torch.zeros(count, dtype=torch.long, device=flat.device).scatter_(0, index, rows)
    return Sequences(index.view(B, N), count, batch_row)


def shift_candidates(candidates: Tensor, shift: bool) -> Tensor:
    """Per-position candidate lists (B, N, K) shifted like the labels they belong to."""
    return shift_values(candidates, PAD, dim=1) if shift else candidates


def first_supervised(target_mask: Tensor, sequences: Optional[Sequences] = None) -> Tensor:
    """(B, N) bool: True at the first position of each row (each sequence) that has a target."""
    if sequences is None:
        return target_mask & (target_mask.cumsum(dim=-1) == 1)  # a bool cumsum counts in int64
    supervised = target_mask.reshape(-1).long()
    seen_before = supervised.cumsum(0) - supervised                    # in row-major order
    index = sequences.index.reshape(-1)
    begins = torch.ones_like(index, dtype=torch.bool)
    begins[1:] = index[1:] != index[:-1]
    at_begin = torch.where(begins, seen_before, 0).cummax(0).values    # seen_before is non-decreasing
    return target_mask & (seen_before == at_begin).view_as(target_mask)


# --- candidate lists ---------------------------------------------------------------------------


def canonical_ids(ids: Tensor, drop: Optional[Tensor] = None) -> Tensor:
    """Sort each list (descending), turn repeats and ``drop`` ids (1-D) into PAD, and trim trailing
    padding.

    ``ids`` (..., K) long with negative entries as padding. The result keeps the leading shape,
    holds each id once, valid ids first, and its last dimension is the longest list after
    de-duplication (≥ 1). Descending, padding sorts last as it is: nine tensor operations.
    """
    if drop is not None and drop.numel():
        ids = ids.masked_fill(torch.isin(ids, drop), PAD)
    ids = ids.sort(dim=-1, descending=True).values
    if ids.shape[-1] > 1:  # a repeat becomes padding, and the valid ids move first again
        ids[..., 1:].masked_fill_(ids[..., 1:] == ids[..., :-1], PAD)    # ids is the sort's own output
        ids = ids.sort(dim=-1, descending=True).values
    if torch.compiler.is_compiling():  # the trim reads data; under tracing keep K (same losses, padded)
        return ids.clamp(min=PAD) if ids.shape[-1] else torch.full((*ids.shape[:-1], 1), PAD, dtype=ids.dtype,
                                                                  device=ids.device)
    width = max(int((ids >= 0).sum(dim=-1).max()) if ids.numel() else 0, 1)
    if ids.shape[-1] < width:  # only when K was 0
        return torch.full((*ids.shape[:-1], width), PAD, dtype=ids.dtype, device=ids.device)
    return ids[..., :width].clamp(min=PAD)  # every padding entry PAD; a fresh, contiguous tensor


def token_sets(labels: Tensor, target_mask: Tensor, drop: Optional[Tensor] = None,
               sequences: Optional[Sequences] = None) -> Tensor:
    """(B, 1, K): the ids that occur as supervised labels in each row, minus ``drop``; with
    ``sequences``, (S, 1, K): those of each sequence."""
    ids = torch.where(target_mask, labels, torch.full_like(labels, PAD))
    if sequences is not None:  # a sequence lies in one row: (its index, column) pairs are unique
        B, N = labels.shape
        columns = torch.arange(N, device=labels.device).expand(B, N)
        laid_out = torch.full((sequences.count, N), PAD, dtype=ids.dtype, device=ids.device)
        ids = laid_out.index_put_((sequences.index.reshape(-1), columns.reshape(-1)), ids.reshape(-1))
    return canonical_ids(ids, drop).unsqueeze(1)


def draw_random_candidates(shape: tuple[int, int], vocab_size: int, num_samples: int,
                           generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """(B, N, num_samples) ids drawn uniformly from [0, V) with replacement.

    Drawn on the generator's device (CPU when there is none) and then moved, so a seeded CPU
    generator gives the same draws whatever device the logits are on.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.randint(vocab_size, (*shape, num_samples), generator=generator, device=gen_device)
    return draws.to(device)


# --- the objectives as support rules ---------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """Shifted labels of a (B, N) batch with what every support rule needs from them."""

    labels: Tensor       # (B, N) long, ignore_index where there is no target
    target_mask: Tensor  # (B, N) bool, True = has a target
    vocab_size: int
    shift: bool
    sequences: Optional[Sequences] = None  # None: each row is one sequence

    def per_sequence(self, lists: Tensor) -> Tensor:
        """Per-row lists (B, ...) → one per sequence (S, ...)."""
        return lists if self.sequences is None else lists[self.sequences.batch_row]

    @property
    def list_count(self) -> int:
        """How many per-sequence lists a support holds: B, or S."""
        return self.labels.shape[0] if self.sequences is None else self.sequences.count


def _exclude_tensor(exclude_ids: Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(list(exclude_ids), dtype=torch.long, device=device)


def mle_support(t: Targets) -> FullSupport:
    return FullSupport()


def smile_support(t: Targets, *, first_token_mle: bool = True, exclude_ids: Sequence[int] = ()) -> ListSupport:
    drop = _exclude_tensor(exclude_ids, t.labels.device)
    full = first_supervised(t.target_mask, t.sequences) if first_token_mle else None
    return ListSupport(token_sets(t.labels, t.target_mask, drop, t.sequences), full, labels_listed=not exclude_ids)


def random_subset_support(t: Targets, *, num_samples: int = 10, generator: Optional[torch.Generator] = None,
                          exclude_ids: Sequence[int] = ()) -> ListSupport:
    B, N = t.labels.shape
    draws = draw_random_candidates((B, N), t.vocab_size, num_samples, generator, t.labels.device)
    return ListSupport(canonical_ids(draws, _exclude_tensor(exclude_ids, t.labels.device)))


def reverse_subset_support(t: Targets, *, exclude_ids: Sequence[int] = ()) -> FullSupport:
    in_sequence = token_sets(t.labels, t.target_mask, sequences=t.sequences)[:, 0]  # (L, K)
    extra = _exclude_tensor(exclude_ids, t.labels.device).expand(in_sequence.shape[0], -1)
    return FullSupport(canonical_ids(torch.cat([in_sequence, extra], dim=-1)))


def selective_eos_support(t: Targets, *, eos_token_id: int) -> FullSupport:
    # The label is never excluded, so a position whose label is EOS keeps it automatically.
    return FullSupport(torch.full((t.list_count, 1), eos_token_id, dtype=torch.long, device=t.labels.device))


def subset_support(t: Targets, *, include: Optional[Tensor] = None, exclude: Optional[Tensor] = None) -> Support:
    if include is not None:
        include = include.to(t.labels.device, torch.long)
        if include.dim() == t.labels.dim():  # (B, K): one list per row, shared by its sequences
            return ListSupport(t.per_sequence(canonical_ids(include).unsqueeze(1)))
        return ListSupport(canonical_ids(shift_candidates(include, t.shift)))  # (B, N, K)
    assert exclude is not None  # validation asks for exactly one of include and exclude
    return FullSupport(t.per_sequence(canonical_ids(exclude.to(t.labels.device, torch.long))))


@dataclass(frozen=True)
class SupportRule:
    """How an objective builds its support from the targets, and the keyword options it accepts
    (beyond the common ones)."""

    build: Callable[..., Support]
    options: tuple[str, ...]


OBJECTIVES: dict[str, SupportRule] = {
    "mle": SupportRule(mle_support, ()),
    "smile": SupportRule(smile_support, ("first_token_mle", "exclude_ids")),
    "random_subset": SupportRule(random_subset_support, ("num_samples", "generator", "exclude_ids")),
    "reverse_subset": SupportRule(reverse_subset_support, ("exclude_ids",)),
    "selective_eos": SupportRule(selective_eos_support, ("eos_token_id",)),
    "subset": SupportRule(subset_support, ("include", "exclude")),
}
"""The one registry of objectives: name → its support rule (``seqloss.OBJECTIVES``)."""
