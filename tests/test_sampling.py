"""The negative samplers: draws follow their proposal q, log_expected is log(K·q), zero weights are never drawn."""
from __future__ import annotations

import math

import pytest
import torch

from seqloss import sampling
from tests.conftest import generator

V = 12
LABELS = torch.tensor([3, 3, 3, 7, 0, 11, 7, 3])
ALL_LABELS = torch.tensor([3, 0, 3, 3, 7, 0, 0, 11, 7, 3])  # with two positions off target (0 there)
TARGET_MASK = torch.tensor([True, False, True, True, True, True, False, True, True, True])


def _sampler(name: str):
    if name != "weights":
        return name
    weights = torch.arange(V, dtype=torch.float32) % 4  # ids 0, 4, 8 have weight 0
    return weights


@pytest.mark.parametrize("name", ["uniform", "log_uniform", "in_batch", "weights"])
@pytest.mark.parametrize("per_position", [False, True])
def test_draws_follow_the_proposal_and_report_log_k_q(name, per_position):
    K = 50_000
    drawn = sampling.draw_negatives(_sampler(name), K, V, ALL_LABELS, TARGET_MASK, per_position, generator(0))
    assert drawn.ids.shape == ((len(ALL_LABELS), K) if per_position else (K,))
    q = sampling.proposal(_sampler(name), V, LABELS)
    frequency = torch.bincount(drawn.ids.reshape(-1), minlength=V).double() / drawn.ids.numel()
    assert (frequency - q).abs().max() < 0.01
    assert (frequency[q == 0] == 0).all()
    torch.testing.assert_close(drawn.log_expected.double(), math.log(K) + q[drawn.ids].log(), atol=1e-5, rtol=0)


def test_a_draw_rounding_up_to_the_total_goes_to_the_last_id_of_positive_weight(monkeypatch):
    monkeypatch.setattr(sampling, "_uniform_draws", lambda shape, g, device: torch.ones(shape, dtype=torch.float64))
    weights = torch.tensor([0.0, 2.0, 1.0, 0.0, 0.0])
    drawn = sampling.draw_negatives(weights, 4, 5, ALL_LABELS, TARGET_MASK, False, None)
    assert drawn.ids.tolist() == [2] * 4 and torch.isfinite(drawn.log_expected).all()


def test_in_batch_draws_only_the_supervised_labels_and_stays_finite_without_any():
    drawn = sampling.draw_negatives("in_batch", 1000, V, ALL_LABELS, TARGET_MASK, False, generator(1))
    assert set(drawn.ids.tolist()) == set(LABELS.tolist())
    none = sampling.draw_negatives("in_batch", 10, V, ALL_LABELS, torch.zeros_like(TARGET_MASK), True, generator(1))
    assert none.ids.shape == (len(ALL_LABELS), 10) and torch.isfinite(none.log_expected).all()
    empty = sampling.draw_negatives("in_batch", 10, V, ALL_LABELS[:0], TARGET_MASK[:0], True, generator(1))
    assert empty.ids.shape == (0, 10)


def test_a_generator_reproduces_the_draws():
    first = sampling.draw_negatives("log_uniform", 30, V, ALL_LABELS, TARGET_MASK, True, generator(5))
    again = sampling.draw_negatives("log_uniform", 30, V, ALL_LABELS, TARGET_MASK, True, generator(5))
    assert torch.equal(first.ids, again.ids) and torch.equal(first.log_expected, again.log_expected)
