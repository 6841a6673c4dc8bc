"""Causal LM: position i predicts item i + 1."""
from __future__ import annotations

import pytest
import torch

from seqloss.masking.common import IGNORE_INDEX

from .helpers import lengths_of, random_batch, scheme


def next_items_by_loop(item_ids: torch.Tensor, last_only: bool) -> torch.Tensor:
    """The spec, row by row: targets[b, i] = item_ids[b, i + 1] for i < n_b - 1 (only i = n_b - 2)."""
    targets = torch.full(item_ids.shape, IGNORE_INDEX, dtype=torch.long)
    for b, n in enumerate(lengths_of(item_ids).tolist()):
        for i in range(n - 1):
            if not last_only or i == n - 2:
                targets[b, i] = item_ids[b, i + 1]
    return targets


@pytest.mark.parametrize("last_only", [False, True])
def test_train_targets_match_the_loop(last_only):
    item_ids = random_batch(200, 9)
    out = scheme("clm", train_on_last_item_only=last_only)(item_ids, "train")
    assert torch.equal(out.targets, next_items_by_loop(item_ids, last_only))
    assert torch.equal(out.input_ids, item_ids) and not out.input_mask.any()


@pytest.mark.parametrize("last_only", [False, True])
def test_eval_targets_match_the_loop(last_only):
    item_ids = random_batch(200, 9)
    out = scheme("clm", eval_on_last_item_only=last_only)(item_ids, "eval")
    assert torch.equal(out.targets, next_items_by_loop(item_ids, last_only))


def test_train_and_eval_options_are_independent():
    item_ids = random_batch(50, 9)
    s = scheme("clm", train_on_last_item_only=True, eval_on_last_item_only=False)
    assert torch.equal(s(item_ids, "train").targets, next_items_by_loop(item_ids, last_only=True))
    assert torch.equal(s(item_ids, "eval").targets, next_items_by_loop(item_ids, last_only=False))


def test_example_rows():
    item_ids = torch.tensor([[4, 5, 6, 0], [7, 0, 0, 0], [0, 0, 0, 0], [1, 2, 3, 4]])
    out = scheme("clm")(item_ids, "eval")
    x = IGNORE_INDEX
    assert out.targets.tolist() == [[x, 6, x, x], [x, x, x, x], [x, x, x, x], [x, x, 4, x]]
    assert not scheme("clm")(item_ids, "infer").target_mask.any()
