"""Masked language modelling (mlm): hide random items and predict them from both sides.

BERT (Devlin et al., 2019, arXiv 1810.04805), BERT4Rec (Sun et al., 2019, arXiv 1904.06690), and
Hugging Face's ``DataCollatorForLanguageModeling``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor, nn

from .common import (
    MaskingOutput,
    MaskingScheme,
    check_int,
    check_probability,
    item_mask,
    last_item_mask,
    next_item_targets,
    slot_output,
    some_but_not_all,
    targets_where,
    unhidden_output,
)


@functools.lru_cache(maxsize=64)
def calibrated_rates(probability: float, max_length: int) -> Tensor:
    """(max_length + 1,) float64: the Bernoulli rate q[n] to draw targets with in a row of n items so
    that, after ``some_but_not_all``, the row expects exactly ``probability * n`` targets.

    With the correction, a row of n >= 2 items expects n q + (1 - q)^n - q^n targets (one added when
    none was drawn, one removed when all were), which increases with q; bisection finds its root.
    Rows too short to expect one target (probability * n <= 1) get q = 0: exactly one target. This
    covers rows of 0 or 1 item, which end with min(n, 1) targets whatever q is.
    """
    n = torch.arange(max_length + 1, dtype=torch.float64)
    low, high = torch.zeros_like(n), torch.ones_like(n)
    for _ in range(60):  # halves the bracket of every length at once; 2^-60 is below fp64 spacing
        q = (low + high) / 2
        too_many = n * q + (1 - q) ** n - q ** n > probability * n
        high = torch.where(too_many, q, high)
        low = torch.where(too_many, low, q)
    return torch.where(probability * n > 1, (low + high) / 2, 0.0)


def draw_targets(lengths: Tensor, length: int, probability: float,
                 generator: Optional[torch.Generator]) -> Tensor:
    """(B, length) bool: calibrated Bernoulli targets among each row's items, at least one per
    non-empty row and never all items of a row of >= 2 (see ``calibrated_rates``)."""
    rates = calibrated_rates(probability, length).to(device=lengths.device, dtype=torch.float32)[lengths]
    u = torch.rand((lengths.shape[0], length), generator=generator, device=lengths.device)
    drawn = (u < rates.unsqueeze(1)) & item_mask(lengths, length)
    return some_but_not_all(drawn, lengths, generator)


class MaskEmbedding(nn.Module):
    """A learned vector that replaces the embeddings of hidden inputs (embedding-level masking, as in
    Transformers4Rec): ``forward(embeddings (B, L, H), input_mask (B, L) bool) -> (B, L, H)``, the
    embeddings with ``input_mask`` positions swapped for the vector. Use it with
    ``MaskingOutput.input_mask`` when the model has no [MASK] id.

    Args:
        hidden_size: H, the embedding width.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size, minimum=1)
        # Initialised like BERT's embeddings (std 0.02) so it starts at the scale of the items.
        self.weight = nn.Parameter(torch.randn(self.hidden_size) * 0.02)

    def forward(self, embeddings: Tensor, input_mask: Tensor) -> Tensor:
        if embeddings.dim() != 3 or embeddings.shape[-1] != self.hidden_size:
            raise ValueError(f"embeddings must have shape (B, L, {self.hidden_size}), got {tuple(embeddings.shape)}")
        if input_mask.dtype != torch.bool or tuple(input_mask.shape) != tuple(embeddings.shape[:2]):
            raise ValueError(f"input_mask must be a bool tensor of shape {tuple(embeddings.shape[:2])}, "
                             f"got {input_mask.dtype} {tuple(input_mask.shape)}")
        return torch.where(input_mask.unsqueeze(-1), self.weight.to(embeddings.dtype), embeddings)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}"


class MaskedLM(MaskingScheme):
    """Random items become targets and are hidden; the model predicts them from both sides.

    Alignment: a target sits at its own position, ``targets[:, i] = item_ids[:, i]``, and the
    output at i (whose input is hidden) predicts it.

    Hiding. Without ``mask_token_id``, hiding is embedding-level: ``input_ids`` is a copy of the
    items and ``input_mask`` marks every target, for ``MaskEmbedding``. With ``mask_token_id``,
    hiding is id-level, as in BERT: in train mode each target's input becomes the [MASK] id with
    ``replace_probability``, a random id with ``random_probability`` (uniform over
    [0, vocab_size) minus ``padding_idx`` and ``mask_token_id``), else stays; ``input_mask``
    marks the [MASK] positions. Eval and infer always use [MASK].

    Modes:
        train: targets drawn per item with a rate calibrated by row length so that a row of n items
            expects ``probability * n`` targets whenever that is >= 1 (shorter rows get exactly one);
            every non-empty row gets >= 1 target and a row of >= 2 items never all (a 1-item row's
            item is its target).
        eval: the last item of each row of >= 2 items, hidden. With
            ``eval_on_last_item_only=False``: every next item in the *causal* layout of ``CausalLM``
            (``targets[:, i] = item_ids[:, i + 1]``, nothing hidden); run the model with a causal
            attention mask for this, since bidirectional attention would see the targets.
        infer: a prediction slot (Transformers4Rec PR #551): inputs become (B, L + 1) with the
            [MASK] id (``padding_idx`` without ``mask_token_id``) at position n_b of each row, right
            after its last item, marked in ``input_mask``; the output there predicts the next item.
            No targets (all -100); every row, even an all-padding one, has exactly one slot.

    Args:
        padding_idx: the right-padding id.
        eval_on_last_item_only: see eval above.
        probability: the target rate, in (0, 1).
        mask_token_id: the [MASK] id for id-level hiding, or None for embedding-level hiding.
        vocab_size: the number of ids random replacements are drawn from; needed when
            ``mask_token_id`` is set and ``random_probability > 0``.
        replace_probability, random_probability: BERT's 80/10/10 split of the targets' inputs.
    """

    name = "mlm"

    def __init__(self, padding_idx: int = 0, eval_on_last_item_only: bool = True, probability: float = 0.15,
                 mask_token_id: Optional[int] = None, vocab_size: Optional[int] = None,
                 replace_probability: float = 0.8, random_probability: float = 0.1) -> None:
        super().__init__(padding_idx, eval_on_last_item_only)
        self.probability = check_probability("probability", probability, open_interval=True)
        self.replace_probability = check_probability("replace_probability", replace_probability,
                                                     open_interval=False)
        self.random_probability = check_probability("random_probability", random_probability, open_interval=False)
        if self.replace_probability + self.random_probability > 1.0:
            raise ValueError("replace_probability + random_probability must be <= 1, got "
                             f"{self.replace_probability} + {self.random_probability}")
        self.mask_token_id = None if mask_token_id is None else check_int("mask_token_id", mask_token_id, minimum=0)
        if self.mask_token_id == self.padding_idx:
            raise ValueError(f"mask_token_id must differ from padding_idx, both are {self.padding_idx}")
        self.vocab_size = None if vocab_size is None else check_int("vocab_size", vocab_size, minimum=1)
        # Random replacements are drawn from the ids left once padding and [MASK] are taken out.
        special = {self.padding_idx} if self.mask_token_id is None else {self.padding_idx, self.mask_token_id}
        self._excluded = tuple(sorted(i for i in special if i < (self.vocab_size or 0)))
        if self.mask_token_id is not None and self.random_probability > 0:
            if self.vocab_size is None:
                raise ValueError("vocab_size is needed to draw random ids when mask_token_id is set and "
                                 "random_probability > 0")
            if self.vocab_size <= len(self._excluded):
                raise ValueError(f"vocab_size={self.vocab_size} leaves no id to draw besides padding_idx and "
                                 "mask_token_id")

    def _train(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        target_mask = draw_targets(lengths, item_ids.shape[1], self.probability, generator)
        return self._hide(item_ids, target_mask, generator, corrupt=True)

    def _eval(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        if not self.eval_on_last_item_only:
            return unhidden_output(item_ids, next_item_targets(item_ids, lengths, last_only=False))
        return self._hide(item_ids, last_item_mask(lengths, item_ids.shape[1]), generator, corrupt=False)

    def _infer(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        fill = self.padding_idx if self.mask_token_id is None else self.mask_token_id
        return slot_output(item_ids, lengths, fill, self.padding_idx)

    def _hide(self, item_ids: Tensor, target_mask: Tensor, generator: Optional[torch.Generator],
              corrupt: bool) -> MaskingOutput:
        """Targets at ``target_mask`` with their inputs hidden; ``corrupt`` applies the 80/10/10 split."""
        targets = targets_where(item_ids, target_mask)
        if self.mask_token_id is None:  # embedding-level: the ids stay, every target is hidden
            return MaskingOutput(targets=targets, target_mask=target_mask, input_ids=item_ids.clone(),
                                 input_mask=target_mask)
        hidden = target_mask
        if corrupt:
            u = torch.rand(item_ids.shape, generator=generator, device=item_ids.device)
            hidden = target_mask & (u < self.replace_probability)
        input_ids = torch.where(hidden, self.mask_token_id, item_ids)
        if corrupt and self.random_probability > 0:
            randomised = target_mask & ~hidden & (u < self.replace_probability + self.random_probability)
            # Draw only as many ids as there are randomised positions (a few percent of the batch).
            input_ids[randomised] = self._random_ids(int(randomised.sum()), item_ids, generator)
        return MaskingOutput(targets=targets, target_mask=target_mask, input_ids=input_ids, input_mask=hidden)

    def _random_ids(self, count: int, item_ids: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """(count,) ids of ``item_ids.dtype``, uniform over [0, vocab_size) without padding_idx and
        mask_token_id."""
        assert self.vocab_size is not None  # checked in __init__ whenever random ids can be drawn
        ids = torch.randint(self.vocab_size - len(self._excluded), (count,), generator=generator,
                            device=item_ids.device)
        # Draw from a range shortened by the excluded ids, then step over each of them in increasing
        # order: a bijection onto the allowed ids.
        for excluded in self._excluded:
            ids += ids >= excluded
        return ids.to(item_ids.dtype)
