"""Labels → supports: shift, first supervised position, row token sets, candidate lists."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from seqloss import OBJECTIVES
from seqloss.support import (
    PAD,
    FullSupport,
    ListSupport,
    Targets,
    canonical_ids,
    draw_random_candidates,
    first_supervised,
    shift_candidates,
    shift_labels,
    token_sets,
)
from tests.conftest import IGNORE, generator

PROPERTY = settings(max_examples=50, deadline=None)


def id_lists(min_leading=0):
    """(B, K) long tensors of ids in [-3, 20) (negative = padding), possibly empty."""
    return st.tuples(st.integers(min_leading, 4), st.integers(0, 8)).flatmap(
        lambda shape: st.lists(st.integers(-3, 19), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1])
        .map(lambda values: torch.tensor(values, dtype=torch.long).reshape(shape)))


def label_batches():
    """(labels (B, N), ignore_index): labels in [0, 12) or ignore_index (which may itself be a valid id)."""
    return st.tuples(st.integers(1, 4), st.integers(1, 8), st.sampled_from([IGNORE, 0, 3]),
                     st.integers(0, 2**16), st.sampled_from([0.0, 0.4, 1.0])).map(_make_label_batch)


def _make_label_batch(args):
    B, N, ignore_index, seed, fraction = args
    g = generator(seed)
    labels = torch.randint(0, 12, (B, N), generator=g)
    labels[torch.rand(B, N, generator=g) < fraction] = ignore_index
    return labels, ignore_index


# --- canonical_ids -----------------------------------------------------------------------------


@PROPERTY
@given(ids=id_lists(), drop=st.lists(st.integers(0, 19), max_size=4))
def test_canonical_ids_hold_each_valid_id_once(ids, drop):
    before = ids.clone()
    out = canonical_ids(ids, torch.tensor(drop, dtype=torch.long))
    assert torch.equal(ids, before), "inputs are never modified"
    assert out.dtype == torch.long and out.shape[:-1] == ids.shape[:-1] and out.shape[-1] >= 1
    for row_in, row_out in zip(ids.tolist(), out.tolist()):
        valid = [v for v in row_out if v >= 0]
        assert set(valid) == {v for v in row_in if v >= 0} - set(drop)
        assert valid == sorted(set(valid), reverse=True), "sorted (descending), each id once"
        assert row_out == valid + [PAD] * (len(row_out) - len(valid)), "valid ids first, then PAD"
    if out.numel():
        assert out.shape[-1] == max(1, int((out >= 0).sum(-1).max())), "trailing padding trimmed"


def test_canonical_ids_keep_leading_dims():
    ids = torch.tensor([[[3, 3, -1], [2, 5, 2]], [[-4, -4, -4], [7, 1, 7]]])
    out = canonical_ids(ids)
    assert out.tolist() == [[[3, PAD], [5, 2]], [[PAD, PAD], [7, 1]]]
    assert canonical_ids(torch.empty(2, 0, dtype=torch.long)).tolist() == [[PAD], [PAD]]


# --- token_sets ----------------------------------------------------------------------------


@PROPERTY
@given(batch=label_batches(), drop=st.lists(st.integers(0, 11), max_size=3))
def test_no_ignored_label_leaks_into_a_row_set(batch, drop):
    labels, ignore_index = batch
    mask = labels != ignore_index
    sets = token_sets(labels, mask, torch.tensor(drop, dtype=torch.long))
    assert sets.shape[:2] == (labels.shape[0], 1)
    for row, row_mask, row_set in zip(labels, mask, sets[:, 0].tolist()):
        valid = [v for v in row_set if v >= 0]
        assert len(valid) == len(set(valid))
        assert set(valid) == set(row[row_mask].tolist()) - set(drop)


def test_token_sets_example():
    labels = torch.tensor([[5, 5, IGNORE, 2], [IGNORE, IGNORE, IGNORE, IGNORE]])
    sets = token_sets(labels, labels != IGNORE)
    assert sets.tolist() == [[[5, 2]], [[PAD, PAD]]]


# --- first_supervised --------------------------------------------------------------------------


@PROPERTY
@given(batch=label_batches())
def test_first_supervised_marks_one_position_per_supervised_row(batch):
    labels, ignore_index = batch
    mask = labels != ignore_index
    first = first_supervised(mask)
    assert first.dtype == torch.bool and first.shape == mask.shape
    assert not (first & ~mask).any()
    for row_mask, row_first in zip(mask, first):
        if row_mask.any():
            assert row_first.nonzero().flatten().tolist() == [int(row_mask.nonzero()[0])]
        else:
            assert not row_first.any()


def test_first_supervised_with_leading_dims():
    mask = torch.tensor([[[False, True, True], [True, False, True]]])
    assert first_supervised(mask).tolist() == [[[False, True, False], [True, False, False]]]


# --- shift_labels / shift_candidates -----------------------------------------------------------


@PROPERTY
@given(batch=label_batches())
def test_shift_labels_follows_hugging_face(batch):
    labels, ignore_index = batch
    before = labels.clone()
    assert torch.equal(shift_labels(labels, False, ignore_index), labels)
    shifted = shift_labels(labels, True, ignore_index)
    assert torch.equal(labels, before)
    assert shifted.shape == labels.shape
    assert torch.equal(shifted[:, :-1], labels[:, 1:])
    assert (shifted[:, -1] == ignore_index).all()


def test_shift_labels_with_leading_dims_and_one_position():
    labels = torch.arange(12).reshape(2, 3, 2)
    assert shift_labels(labels, True, IGNORE).tolist() == [[[1, IGNORE], [3, IGNORE], [5, IGNORE]],
                                                          [[7, IGNORE], [9, IGNORE], [11, IGNORE]]]
    assert shift_labels(torch.tensor([[4]]), True, IGNORE).tolist() == [[IGNORE]]


def test_shift_candidates_moves_with_the_labels():
    cand = torch.arange(2 * 3 * 2).reshape(2, 3, 2)
    assert torch.equal(shift_candidates(cand, False), cand)
    out = shift_candidates(cand, True)
    assert torch.equal(out[:, :-1], cand[:, 1:])
    assert (out[:, -1] == PAD).all()


# --- random candidates -------------------------------------------------------------------------


def test_draw_random_candidates_in_range_and_reproducible():
    a = draw_random_candidates((3, 4), 37, 5, generator(1), torch.device("cpu"))
    b = draw_random_candidates((3, 4), 37, 5, generator(1), torch.device("cpu"))
    assert a.shape == (3, 4, 5) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 37
    big = draw_random_candidates((50, 50), 7, 4, generator(2), torch.device("cpu"))
    assert set(big.unique().tolist()) == set(range(7)), "uniform over [0, V), with replacement"


# --- the objectives as support rules -----------------------------------------------------------


def _targets(labels, V=12, shift=False):
    return Targets(labels, labels != IGNORE, V, shift)


def test_support_kinds():
    labels = torch.tensor([[4, 4, 9, IGNORE], [IGNORE, 1, 2, 1]])
    t = _targets(labels)
    assert isinstance(OBJECTIVES["mle"].build(t), FullSupport)
    smile = OBJECTIVES["smile"].build(t, exclude_ids=(9,))
    assert isinstance(smile, ListSupport)
    assert smile.ids.tolist() == [[[4, PAD]], [[2, 1]]]
    assert smile.full_positions.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert OBJECTIVES["smile"].build(t, first_token_mle=False).full_positions is None
    reverse = OBJECTIVES["reverse_subset"].build(t, exclude_ids=(0,))
    assert isinstance(reverse, FullSupport)
    assert reverse.exclude.tolist() == [[9, 4, 0], [2, 1, 0]]
    eos = OBJECTIVES["selective_eos"].build(t, eos_token_id=3)
    assert eos.exclude.tolist() == [[3], [3]]
    rand = OBJECTIVES["random_subset"].build(t, num_samples=3, generator=generator(0), exclude_ids=(5,))
    assert isinstance(rand, ListSupport) and rand.ids.shape[:2] == (2, 4)
    assert not (rand.ids == 5).any()
    per_row = OBJECTIVES["subset"].build(t, include=torch.tensor([[3, 3, -1], [-1, -1, -1]]))
    assert per_row.ids.tolist() == [[[3]], [[PAD]]]
    excl = OBJECTIVES["subset"].build(t, exclude=torch.tensor([[7, -1, 7], [2, 0, 2]]))
    assert excl.exclude.tolist() == [[7, PAD], [2, 0]]


def test_subset_per_position_candidates_shift_with_the_labels():
    labels = torch.tensor([[4, 5, 6]])
    include = torch.tensor([[[1], [2], [3]]])
    t = _targets(shift_labels(labels, True, IGNORE), shift=True)
    assert OBJECTIVES["subset"].build(t, include=include).ids.tolist() == [[[2], [3], [PAD]]]
