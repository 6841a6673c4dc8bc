"""support.py's sequences: where packed examples start, how turns split them, and the per-sequence
token sets and first supervised positions built on them (the engines' inputs; end to end in
test_packing.py and test_turns.py)."""
from __future__ import annotations

import torch

import seqloss
from seqloss.support import PAD, example_starts, first_supervised, sequences_of, shift_labels, token_sets
from tests.conftest import IGNORE


def test_examples_start_where_positions_restart():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 0, 1, 2, 3]])
    assert example_starts(position_ids).tolist() == [[True, False, False, True, False, True],
                                                     [True, False, True, False, False, False]]
    # A collator's position_ids_start (2 for OPT-like models): a restart is any break in the count.
    assert example_starts(torch.tensor([[2, 3, 4, 2, 3]])).tolist() == [[True, False, False, True, False]]
    assert example_starts(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)


def test_the_shift_never_crosses_an_example():
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    starts = example_starts(torch.tensor([[0, 1, 2, 0, 1]]))
    assert shift_labels(labels, True, IGNORE, starts).tolist() == [[2, 3, IGNORE, 5, IGNORE]]
    assert shift_labels(labels, False, IGNORE, starts).tolist() == labels.tolist()


def test_sequences_of_examples_and_turns():
    target_mask = torch.tensor([[True, True, False, True, True, True]])
    starts = example_starts(torch.tensor([[0, 1, 2, 3, 0, 1]]))
    assert sequences_of(target_mask, None, False) is None
    examples = sequences_of(target_mask, starts, False)
    assert examples.index.tolist() == [[0, 0, 0, 0, 1, 1]] and examples.count == 2
    turns = sequences_of(target_mask, None, True)
    assert turns.index.tolist() == [[0, 0, 0, 1, 1, 1]] and turns.count == 2
    both = sequences_of(target_mask, starts, True)
    assert both.index.tolist() == [[0, 0, 0, 1, 2, 2]] and both.batch_row.tolist() == [0, 0, 0]


def test_first_supervised_and_token_sets_per_sequence():
    labels = torch.tensor([[7, 3, IGNORE, 3, 9], [IGNORE, 4, 4, 8, 1]])
    mask = labels != IGNORE
    seqs = sequences_of(mask, example_starts(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])), False)
    assert first_supervised(mask, seqs).tolist() == [[True, False, False, True, False],
                                                     [False, True, False, False, True]]
    sets = token_sets(labels, mask, sequences=seqs)[:, 0]
    assert sets.shape[0] == 4
    assert [[i for i in row if i != PAD] for row in sets.tolist()] == [[7, 3], [9, 3], [8, 4], [1]]


def test_sequence_reduction_with_turns_sums_rows():
    logits = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2, IGNORE, 3, 4, 5], [6, IGNORE, IGNORE, 1, 1, 2]])
    per_row = seqloss.smile_loss(logits, labels, turns=True, reduction="sequence")
    torch.testing.assert_close(per_row, seqloss.smile_loss(logits, labels, turns=True, reduction="none").sum(-1))
