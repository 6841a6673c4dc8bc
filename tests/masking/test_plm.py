"""Permutation LM: XLNet's spans, and perm_mask / target_mapping checked against explicit loops."""
from __future__ import annotations

import random
from itertools import permutations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from seqloss.masking.plm import permutation_mask, sample_spans

from .helpers import batch, batches, generator, lengths_of, random_batch, scheme


def perm_mask_by_loop(query: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """XLNet's rule, one entry at a time: i may not see j iff j is a prediction and i is not a
    prediction made after j in the order."""
    B, L = query.shape
    perm_mask = torch.zeros(B, L, L)
    for b in range(B):
        for i in range(L):
            for j in range(L):
                later = bool(query[b, i]) and int(order[b, i]) > int(order[b, j])
                perm_mask[b, i, j] = float(bool(query[b, j]) and not later)
    return perm_mask


def order_from_perm_mask(perm_mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Each prediction's rank in the order, read back as the number of predictions it may see."""
    sees = (perm_mask == 0) & query.unsqueeze(1)
    return torch.where(query, sees.sum(dim=2), -1)


def spans_by_loop(length: int, n: int, probability: float, max_span_length: int, rng: random.Random) -> list:
    """XLNet's span sampling for one row of n items, as its per-row loop draws it."""
    targets, cur = [False] * length, 0
    while cur < n:
        span = rng.randint(1, max_span_length)
        context = int(span / probability)
        start = cur + rng.randint(0, context - span)
        for i in range(start, min(start + span, n)):
            targets[i] = True
        cur += context
    return targets


def identity(B: int, L: int) -> torch.Tensor:
    return torch.eye(L).expand(B, L, L)


def test_permutation_mask_matches_the_loop():
    g = generator(0)
    query = torch.rand(30, 9, generator=g) < 0.4
    order = torch.rand(30, 9, generator=g).argsort(dim=1)
    assert torch.equal(permutation_mask(query, order), perm_mask_by_loop(query, order))


@settings(max_examples=40, deadline=None)
@given(data=batches(max_L=10), seed=st.integers(0, 1000), permute_all=st.booleans())
def test_train_perm_mask_is_one_factorisation_order(data, seed, permute_all):
    item_ids, pad = data
    out = scheme("plm", pad, permute_all=permute_all)(item_ids, "train", generator=generator(seed))
    query = out.target_mask
    order = order_from_perm_mask(out.perm_mask, query)
    # The ranks read back are 0 .. T-1 once each (a strict order), and the loop rebuilds the mask.
    for b in range(len(order)):
        assert sorted(order[b][query[b]].tolist()) == list(range(int(query[b].sum())))
    assert torch.equal(out.perm_mask, perm_mask_by_loop(query, order))
    assert torch.equal(out.target_mapping, identity(*query.shape))
    if permute_all:
        assert torch.equal(query, item_ids != pad)


def test_orders_are_uniform():
    item_ids = batch([4] * 24_000, 4)
    out = scheme("plm", permute_all=True)(item_ids, "train", generator=generator(1))
    order = order_from_perm_mask(out.perm_mask, out.target_mask)
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    counts = torch.bincount(codes, minlength=256)[[sum(r * w for r, w in zip(p, (64, 16, 4, 1)))
                                                   for p in permutations(range(4))]]
    assert counts.sum() == 24_000  # every row is one of the 24 orders; each ~1000 +- 31
    assert (counts - 1000).abs().max() < 160


@pytest.mark.parametrize("length, probability, max_span_length", [(12, 1 / 6, 5), (40, 1 / 6, 5), (40, 0.3, 3)])
def test_spans_follow_xlnet_per_position(length, probability, max_span_length):
    """The batched draw has the loop's distribution: the same target rate at every position."""
    rows = 20_000
    lengths = torch.randint(1, length + 1, (rows,), generator=generator(2))
    fast = sample_spans(lengths, length, probability, max_span_length, generator(3)).float().mean(dim=0)
    rng = random.Random(4)
    slow = torch.tensor([spans_by_loop(length, n, probability, max_span_length, rng)
                         for n in lengths.tolist()]).float().mean(dim=0)
    assert (fast - slow).abs().max() < 0.02  # two rates of ~0.15 from 20k rows each: s.e. < 0.004


def test_long_rows_target_rate():
    """A span of s gets a context of 6 s: the rate is E[s] / E[6 s] = 1/6 away from the row's end."""
    spans = sample_spans(torch.full((4000,), 300), 300, 1 / 6, 5, generator(5))
    assert abs(spans.float().mean().item() - 1 / 6) < 0.005


def test_spans_stay_in_rows_and_every_row_learns():
    item_ids = random_batch(3000, 30)
    out = scheme("plm", max_span_length=3)(item_ids, "train", generator=generator(6))
    n = lengths_of(item_ids)
    assert not (out.target_mask & (item_ids == 0)).any()
    assert (out.target_mask.sum(1)[n >= 1] >= 1).all() and (out.target_mask.sum(1)[n >= 2] < n[n >= 2]).all()


def test_eval_last_item_is_hidden_from_everyone():
    item_ids = random_batch(50, 8)
    out = scheme("plm")(item_ids, "eval")
    n = lengths_of(item_ids)
    expected = torch.zeros(50, 8, 8)
    for b in range(50):
        if n[b] >= 2:
            expected[b, :, n[b] - 1] = 1
    assert torch.equal(out.perm_mask, expected)
    assert torch.equal(out.target_mapping, identity(50, 8))


def test_eval_every_next_item_sees_exactly_its_past():
    item_ids = random_batch(50, 8)
    out = scheme("plm", eval_on_last_item_only=False)(item_ids, "eval")
    n = lengths_of(item_ids)
    query = torch.stack([(torch.arange(8) >= 1) & (torch.arange(8) < m) for m in n.tolist()])
    assert torch.equal(out.target_mask, query)
    assert torch.equal(out.perm_mask, perm_mask_by_loop(query, torch.arange(8).expand(50, 8)))


def test_infer_slot_is_hidden_and_predicted():
    item_ids = torch.tensor([[4, 5, 0], [1, 2, 3], [0, 0, 0]])
    out = scheme("plm")(item_ids, "infer")
    slot = torch.tensor([2, 3, 0])
    assert out.input_mask.nonzero()[:, 1].tolist() == slot.tolist()
    for b in range(3):
        column = torch.zeros(4, 4)
        column[:, slot[b]] = 1
        assert torch.equal(out.perm_mask[b], column)
    assert torch.equal(out.target_mapping, identity(3, 4))


def test_a_kept_perm_mask_is_never_overwritten_by_the_next_call():
    plm = scheme("plm")
    item_ids = random_batch(16, 10, min_length=2)
    first = plm(item_ids, "train", generator=generator(1)).perm_mask
    kept = first.clone()
    for seed in range(2, 6):  # later calls, some of them reusing freed memory
        plm(item_ids, "train", generator=generator(seed))
        second = plm(item_ids, "train", generator=generator(seed)).perm_mask
        assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)
