"""What every masking scheme shares: the output, the input checks and the vectorised helpers.

Conventions (DESIGN §3). ``item_ids`` is (B, L), right-padded with ``padding_idx``; the *length*
n_b of row b is its number of items (non-padding ids), so its items sit at positions 0 .. n_b - 1.
A target is the id that the model's output at a position must predict; ``IGNORE_INDEX`` (-100,
PyTorch's and Hugging Face's ``ignore_index``) marks positions without one.

Every helper works on whole batches with tensor ops: no Python loop ever runs over rows.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""The target of a position that has none (Hugging Face's and torch's ``ignore_index``)."""
MODES = ("train", "eval", "infer")
"""What a scheme can be called for: training targets, evaluation targets, or inference slots."""


@dataclass(frozen=True)
class MaskingOutput:
    """The result of ``scheme(item_ids, mode, generator)``. L' is L, or L + 1 where a scheme appends a
    prediction slot in ``"infer"`` mode (mlm, rtd, plm).

    Attributes:
        targets: (B, L') long. The id that the output at (b, i) must predict; -100 where none.
            Which position predicts which item is scheme-specific and stated in each scheme's docstring.
        target_mask: (B, L') bool. True where there is a target; always ``targets != -100``.
        input_ids: (B, L') ids to feed the model, ``item_ids.dtype``: the items, corrupted where the
            scheme corrupts ids (mlm/rtd with ``mask_token_id``), plus the slot in infer mode. A new
            tensor, never ``item_ids`` itself.
        input_mask: (B, L') bool. True where the input must be hidden: swap its embedding for a
            learned vector with ``MaskEmbedding``.
        perm_mask: (B, L', L') float32 for plm, else None. 1 where position i may NOT attend to
            position j (XLNet's ``perm_mask``).
        target_mapping: (B, L', L') float32 for plm, else None. XLNet's ``target_mapping``: the
            identity (prediction k is made at position k, so it lines up with ``targets[:, k]``),
            a broadcast view.
    """

    targets: Tensor
    target_mask: Tensor
    input_ids: Tensor
    input_mask: Tensor
    perm_mask: Optional[Tensor] = None
    target_mapping: Optional[Tensor] = None


# --- input checks ------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_probability(name: str, value: Any, *, open_interval: bool) -> float:
    """A probability in (0, 1) (a rate of targets: 0 or 1 would give no or all targets) or in [0, 1]."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    probability = float(value)
    inside = 0.0 < probability < 1.0 if open_interval else 0.0 <= probability <= 1.0
    if not inside:
        raise ValueError(f"{name} must be in {'(0, 1)' if open_interval else '[0, 1]'}, got {value}")
    return probability


def check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def check_item_ids(item_ids: Any, padding_idx: int) -> Tensor:
    """Check a (B, L) right-padded batch of non-negative integer ids; return the lengths (B,) long."""
    if not isinstance(item_ids, Tensor):
        raise TypeError(f"item_ids must be a torch.Tensor, got {type(item_ids).__name__}")
    if item_ids.is_floating_point() or item_ids.is_complex() or item_ids.dtype == torch.bool:
        raise TypeError(f"item_ids must hold integer ids (e.g. torch.long), got {item_ids.dtype}")
    if item_ids.dim() != 2:
        raise ValueError(f"item_ids must have shape (B, L), got {tuple(item_ids.shape)}")
    if item_ids.numel() and int(item_ids.min()) < 0:
        raise ValueError(f"item_ids must be non-negative ids, found {int(item_ids.min())}")
    is_item = item_ids != padding_idx
    # Right padding means a row never has an item after a padding id; every position rule
    # below ("the last item is at n_b - 1") depends on it.
    gap = ~is_item[:, :-1] & is_item[:, 1:]
    if bool(gap.any()):
        row = int(gap.any(dim=1).nonzero()[0])
        raise ValueError(
            f"item_ids must be right-padded: row {row} has padding_idx={padding_idx} before an item. "
            "Left padding (or padding inside a row) is not supported; move the padding to the end "
            "of each row.")
    return is_item.count_nonzero(dim=1)


def check_options(scheme: str, options: dict[str, Any], accepted: Any) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"{scheme} masking got unknown option(s) {unknown}; it accepts {sorted(accepted)}")


# --- positions ---------------------------------------------------------------------------------


def positions(length: int, device: torch.device) -> Tensor:
    """(1, length) long: 0, 1, ..., length - 1, to compare against per-row (B, 1) positions."""
    return torch.arange(length, device=device).unsqueeze(0)


def item_mask(lengths: Tensor, length: int) -> Tensor:
    """(B, length) bool: True at the items of each row."""
    return positions(length, lengths.device) < lengths.unsqueeze(1)


def last_item_mask(lengths: Tensor, length: int) -> Tensor:
    """(B, length) bool: True at the last item of each row that has a history (>= 2 items): the
    only rows where predicting the last item from the items before it is meaningful."""
    last = torch.where(lengths >= 2, lengths - 1, -1)
    return positions(length, lengths.device) == last.unsqueeze(1)


def slot_mask(lengths: Tensor, length: int) -> Tensor:
    """(B, length + 1) bool: True at position n_b, right after each row's last item, which is the
    first padding position or, for a full row, the appended column."""
    return positions(length + 1, lengths.device) == lengths.unsqueeze(1)


def uniform_index(lengths: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """(B,) long: a uniform draw from [0, n_b) per row (0 for empty rows)."""
    u = torch.rand(lengths.shape, generator=generator, device=lengths.device, dtype=torch.float64)
    # The clamp only guards against u * n rounding up to n.
    return torch.minimum((u * lengths).long(), (lengths - 1).clamp(min=0))


# --- targets -----------------------------------------------------------------------------------


def targets_where(item_ids: Tensor, mask: Tensor) -> Tensor:
    """(B, L) long: the item itself where ``mask``, -100 elsewhere."""
    return torch.where(mask, item_ids.long(), IGNORE_INDEX)


def next_item_targets(item_ids: Tensor, lengths: Tensor, last_only: bool) -> Tensor:
    """(B, L) long in the causal layout: ``targets[:, i] = item_ids[:, i + 1]`` for every i < n_b - 1,
    or, with ``last_only``, only for i = n_b - 2 (the position that predicts the last item)."""
    B, L = item_ids.shape
    pos = positions(max(L - 1, 0), item_ids.device)  # the positions that have a next one
    keep = pos == (lengths - 2).unsqueeze(1) if last_only else pos < (lengths - 1).unsqueeze(1)
    targets = torch.full((B, L), IGNORE_INDEX, dtype=torch.long, device=item_ids.device)
    targets[:, :-1] = torch.where(keep, item_ids[:, 1:].long(), IGNORE_INDEX)
    return targets


def some_but_not_all(drawn: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """(B, L) bool: ``drawn`` with one uniformly chosen item added to rows that drew no target, and one
    removed from rows of >= 2 items that drew every item. Rows that drew some but not all keep their
    draw, so long rows keep their rate (Transformers4Rec forces a target into every row instead,
    which over-masks short rows). A 1-item row ends with its item as target: it has no context
    either way, and it still teaches the model the item's prior."""
    count = drawn.count_nonzero(dim=1)
    fix = ((count == 0) & (lengths >= 1)) | ((count == lengths) & (lengths >= 2))
    chosen = positions(drawn.shape[1], drawn.device) == uniform_index(lengths, generator).unsqueeze(1)
    # In a row to fix, the chosen item is a non-target (add it) or, when all are targets, a target
    # (remove it): flipping it does both.
    return drawn ^ (chosen & fix.unsqueeze(1))


# --- outputs -----------------------------------------------------------------------------------


def unhidden_output(item_ids: Tensor, targets: Tensor) -> MaskingOutput:
    """Targets on untouched inputs (the causal layout, and the no-target infer outputs)."""
    return MaskingOutput(targets=targets, target_mask=targets != IGNORE_INDEX, input_ids=item_ids.clone(),
                         input_mask=torch.zeros_like(targets, dtype=torch.bool))


def slot_output(item_ids: Tensor, lengths: Tensor, fill_id: int, padding_idx: int) -> MaskingOutput:
    """Infer-mode output with a prediction slot: (B, L + 1) inputs, the items followed by padding,
    with ``fill_id`` at position n_b of each row, marked in ``input_mask``; no targets (the next
    item is what is asked for)."""
    B, L = item_ids.shape
    slot = slot_mask(lengths, L)
    padded = torch.cat([item_ids, item_ids.new_full((B, 1), padding_idx)], dim=1)
    input_ids = torch.where(slot, fill_id, padded)
    targets = torch.full((B, L + 1), IGNORE_INDEX, dtype=torch.long, device=item_ids.device)
    return MaskingOutput(targets=targets, target_mask=torch.zeros_like(slot), input_ids=input_ids,
                         input_mask=slot)


class MaskingScheme:
    """Base of every scheme: checks the call once, then runs ``_train``, ``_eval`` or ``_infer`` with
    the checked ``item_ids``, the row lengths (B,) and the generator.

    Args:
        padding_idx: the id that right-pads rows (never a target, never drawn as a random id).
        eval_on_last_item_only: in eval mode, predict only each row's last item (True), or every
            item that has a history (False).
    """

    name = ""

    def __init__(self, padding_idx: int = 0, eval_on_last_item_only: bool = True) -> None:
        self.padding_idx = check_int("padding_idx", padding_idx, minimum=0)
        self.eval_on_last_item_only = check_bool("eval_on_last_item_only", eval_on_last_item_only)

    def __call__(self, item_ids: Tensor, mode: str = "train",
                 generator: Optional[torch.Generator] = None) -> MaskingOutput:
        """Targets and inputs for ``item_ids`` (B, L), right-padded, in ``mode`` "train", "eval" or
        "infer". Random choices draw from ``generator`` (the global RNG when None), so a seeded
        generator reproduces the output. ``item_ids`` is never modified."""
        lengths = check_item_ids(item_ids, self.padding_idx)
        check_mode(mode)
        check_generator(generator)
        return getattr(self, f"_{mode}")(item_ids, lengths, generator)

    def _train(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        raise NotImplementedError

    def _eval(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        raise NotImplementedError

    def _infer(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"
