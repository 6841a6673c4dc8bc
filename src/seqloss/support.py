"""Labels → supports: shift, first supervised position, row token sets, candidate lists.

Every objective of seqloss is a *support rule*: at position (b, n) the softmax runs over a set
S(b, n) of vocabulary ids that always contains the label y. Two shapes of rule cover them all:

* :class:`FullSupport` — all V ids minus an exclusion list (MLE, reverse subsetting, selective EOS,
  ``subset(exclude=...)``). The work is O(V) per position.
* :class:`ListSupport` — an explicit candidate list (SMILE, random subsetting,
  ``subset(include=...)``). The work is O(K) per position; positions flagged in
  ``full_positions`` (SMILE's first-token MLE) use all V ids instead.

Lists hold ids sorted and de-duplicated with -1 as padding, so that an id is never counted twice in
a log-sum-exp. The label itself is *not* stored in a list: the loss adds it once per position.
Both the efficient path and the tests build on these structures; the dense spec in
``reference.py`` builds its masks straight from the labels instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

PAD = -1  # padding entry of a candidate or exclusion list


@dataclass(frozen=True)
class FullSupport:
    """All V ids minus ``exclude`` (B, 1 or N, K), PAD-padded; the label is never excluded."""

    exclude: Optional[Tensor] = None


@dataclass(frozen=True)
class ListSupport:
    """The label plus ``ids`` (B, 1 or N, K), PAD-padded, unique along K.

    ``full_positions`` (B, N) bool marks positions that use every id instead (first-token MLE).
    """

    ids: Tensor
    full_positions: Optional[Tensor] = None


Support = Union[FullSupport, ListSupport]


# --- targets -----------------------------------------------------------------------------------


def shift_labels(labels: Tensor, shift: bool, ignore_index: int) -> Tensor:
    """Labels aligned with the logits positions that predict them.

    With ``shift=True`` position n is scored against ``labels[..., n + 1]`` and the last position
    has no target (Hugging Face's ``ForCausalLMLoss`` convention), so the result keeps shape N.
    """
    if not shift:
        return labels
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def shift_candidates(candidates: Tensor, shift: bool) -> Tensor:
    """Per-position candidate lists (B, N, K) shifted like the labels they belong to."""
    if not shift:
        return candidates
    return torch.nn.functional.pad(candidates[:, 1:], (0, 0, 0, 1), value=PAD)


def first_supervised(target_mask: Tensor) -> Tensor:
    """(B, N) bool: True at the first position of each row that has a target."""
    seen_before = target_mask.long().cumsum(dim=-1) - target_mask.long()
    return target_mask & (seen_before == 0)


# --- candidate lists ---------------------------------------------------------------------------


def canonical_ids(ids: Tensor, drop: Optional[Tensor] = None) -> Tensor:
    """Sort each list, turn repeats and ``drop`` ids (1-D) into PAD, and trim trailing padding.

    ``ids`` (..., K) long with negative entries as padding. The result keeps the leading shape,
    holds each id once, and its last dimension is the longest list after de-duplication (≥ 1).
    """
    ids = torch.where(ids < 0, torch.full_like(ids, PAD), ids)
    if drop is not None and drop.numel():
        ids = torch.where(torch.isin(ids, drop), torch.full_like(ids, PAD), ids)
    big = torch.iinfo(ids.dtype).max
    ids, _ = torch.where(ids < 0, torch.full_like(ids, big), ids).sort(dim=-1)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.where(repeat | (ids == big), torch.full_like(ids, PAD), ids)
    ids, _ = torch.where(ids < 0, torch.full_like(ids, big), ids).sort(dim=-1)  # valid ids first
    ids = torch.where(ids == big, torch.full_like(ids, PAD), ids)
    if torch.compiler.is_compiling():  # the trim reads data; under tracing keep K (same losses, padded)
        return ids.contiguous() if ids.shape[-1] else torch.full((*ids.shape[:-1], 1), PAD, dtype=ids.dtype,
                                                                       device=ids.device)
    width = max(int((ids >= 0).sum(dim=-1).max()) if ids.numel() else 0, 1)
    if ids.shape[-1] < width:  # only when K was 0
        return torch.full((*ids.shape[:-1], width), PAD, dtype=ids.dtype, device=ids.device)
    return ids[..., :width].contiguous()


def row_token_sets(labels: Tensor, target_mask: Tensor, drop: Optional[Tensor] = None) -> Tensor:
    """(B, 1, K): the ids that occur as supervised labels in each row, minus ``drop``."""
    ids = torch.where(target_mask, labels, torch.full_like(labels, PAD))
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


def _exclude_tensor(exclude_ids: Sequence[int], device: torch.device) -> Tensor:
    return torch.as_tensor(list(exclude_ids), dtype=torch.long, device=device)


def mle_support(t: Targets) -> FullSupport:
    return FullSupport()


def smile_support(t: Targets, *, first_token_mle: bool = True, exclude_ids: Sequence[int] = ()) -> ListSupport:
    drop = _exclude_tensor(exclude_ids, t.labels.device)
    full = first_supervised(t.target_mask) if first_token_mle else None
    return ListSupport(row_token_sets(t.labels, t.target_mask, drop), full)


def random_subset_support(t: Targets, *, num_samples: int = 10, generator: Optional[torch.Generator] = None,
                          exclude_ids: Sequence[int] = ()) -> ListSupport:
    B, N = t.labels.shape
    draws = draw_random_candidates((B, N), t.vocab_size, num_samples, generator, t.labels.device)
    return ListSupport(canonical_ids(draws, _exclude_tensor(exclude_ids, t.labels.device)))


def reverse_subset_support(t: Targets, *, exclude_ids: Sequence[int] = ()) -> FullSupport:
    in_row = row_token_sets(t.labels, t.target_mask)  # (B, 1, K)
    extra = _exclude_tensor(exclude_ids, t.labels.device).expand(in_row.shape[0], 1, -1)
    return FullSupport(canonical_ids(torch.cat([in_row, extra], dim=-1)))


def selective_eos_support(t: Targets, *, eos_token_id: int) -> FullSupport:
    # The label is never excluded, so a position whose label is EOS keeps it automatically.
    B = t.labels.shape[0]
    return FullSupport(torch.full((B, 1, 1), eos_token_id, dtype=torch.long, device=t.labels.device))


def subset_support(t: Targets, *, include: Optional[Tensor] = None, exclude: Optional[Tensor] = None) -> Support:
    if include is not None:
        include = include.to(t.labels.device, torch.long)
        if include.dim() == t.labels.dim():  # (B, K): one list per row
            return ListSupport(canonical_ids(include).unsqueeze(1))
        return ListSupport(canonical_ids(shift_candidates(include, t.shift)))  # (B, N, K)
    assert exclude is not None  # validation asks for exactly one of include and exclude
    return FullSupport(canonical_ids(exclude.to(t.labels.device, torch.long)).unsqueeze(1))


@dataclass(frozen=True)
class Objective:
    """A support rule and the keyword options it accepts (beyond the common ones)."""

    build: Callable[..., Support]
    options: tuple[str, ...]


OBJECTIVES: dict[str, Objective] = {
    "mle": Objective(mle_support, ()),
    "smile": Objective(smile_support, ("first_token_mle", "exclude_ids")),
    "random_subset": Objective(random_subset_support, ("num_samples", "generator", "exclude_ids")),
    "reverse_subset": Objective(reverse_subset_support, ("exclude_ids",)),
    "selective_eos": Objective(selective_eos_support, ("eos_token_id",)),
    "subset": Objective(subset_support, ("include", "exclude")),
}
