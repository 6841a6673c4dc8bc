"""Causal language modelling (clm): every position predicts the item that follows it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import IGNORE_INDEX, MaskingOutput, MaskingScheme, check_bool, next_item_targets, unhidden_output


class CausalLM(MaskingScheme):
    """Next-item targets for a model with causal (left-to-right) attention: GPT-2, SASRec.

    Alignment: position i predicts item i + 1, so ``targets[:, i] = item_ids[:, i + 1]`` for
    i < n_b - 1 and -100 at the last item and the padding. Inputs are never hidden or corrupted:
    ``input_ids`` is a copy of ``item_ids`` and ``input_mask`` is all False (the causal attention
    mask is what keeps the future out of sight).

    Modes:
        train: every next item; only the last one (at i = n_b - 2) with ``train_on_last_item_only``.
        eval: the last item only (``eval_on_last_item_only=True``) or every next item.
        infer: no targets; the output at each row's last item (i = n_b - 1) predicts the next item.

    Rows with fewer than 2 items have no target in any mode: nothing precedes their item.

    Args:
        padding_idx: the right-padding id.
        eval_on_last_item_only: see eval above.
        train_on_last_item_only: see train above.
    """

    name = "clm"

    def __init__(self, padding_idx: int = 0, eval_on_last_item_only: bool = True,
                 train_on_last_item_only: bool = False) -> None:
        super().__init__(padding_idx, eval_on_last_item_only)
        self.train_on_last_item_only = check_bool("train_on_last_item_only", train_on_last_item_only)

    def _train(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        return unhidden_output(item_ids, next_item_targets(item_ids, lengths, self.train_on_last_item_only))

    def _eval(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        return unhidden_output(item_ids, next_item_targets(item_ids, lengths, self.eval_on_last_item_only))

    def _infer(self, item_ids: Tensor, lengths: Tensor, generator: Optional[torch.Generator]) -> MaskingOutput:
        return unhidden_output(item_ids, torch.full_like(item_ids, IGNORE_INDEX, dtype=torch.long))
