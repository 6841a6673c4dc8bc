"""One denominator per optimiser step: ``seqloss.num_items_in_batch`` across micro-batches and ranks."""
from __future__ import annotations

import pytest
import torch

import seqloss
from tests.conftest import IGNORE, assert_close_fp32
from tests.parallel import cases
from tests.parallel.workers import Pool


def test_it_counts_what_the_mean_divides_by():
    labels = torch.tensor([[IGNORE, 3, 4, IGNORE, 5], [1, 2, IGNORE, 3, 3]])
    assert seqloss.num_items_in_batch(labels) == 7
    assert seqloss.num_items_in_batch(labels, shift=True) == 6  # the first label of each row has no position
    packed = torch.tensor([[0, 1, 2, 3, 0], [0, 1, 2, 3, 4]])
    assert seqloss.num_items_in_batch(labels, shift=True, position_ids=packed) == 5  # nor has an example's first
    weights = torch.rand(2, 5) / 8  # weight sums below 1 count as they are
    class_weight = torch.rand(6)
    logits = torch.randn(2, 5, 6)
    for kwargs in ({}, dict(token_weights=weights), dict(weight=class_weight), dict(token_weights=weights,
                                                                                    weight=class_weight)):
        summed = seqloss.cross_entropy(logits, labels, shift=True, reduction="sum", **kwargs)
        mean = seqloss.cross_entropy(logits, labels, shift=True, **kwargs)
        assert_close_fp32(summed / seqloss.num_items_in_batch(labels, shift=True, **kwargs), mean)


def test_micro_batches_add_up():
    a, b = torch.tensor([[1, IGNORE, 2]]), torch.tensor([[IGNORE, IGNORE, 2], [1, 1, 1]])
    assert seqloss.num_items_in_batch([a, b]) == 6
    with pytest.raises(ValueError, match="position_ids"):
        seqloss.num_items_in_batch([a, b], position_ids=[torch.zeros(1, 3, dtype=torch.long)])
    with pytest.raises(TypeError, match="labels"):
        seqloss.num_items_in_batch(torch.ones(3))


@pytest.mark.parametrize("objective", ["mle", "smile"])
def test_two_ranks_with_two_micro_batches_take_the_one_process_step(objective):
    pool = Pool(2)
    try:
        results = pool.run(cases.one_step, 3, 2, objective)
    finally:
        pool.close()
    everything = [batch for rank in cases.step_batches(3, 2, 2) for batch in rank]
    logits = torch.cat([x for x, _ in everything])
    labels = torch.cat([y for _, y in everything])
    leaf = logits.clone().requires_grad_(True)
    truth = seqloss.objective_loss(leaf, labels, objective, shift=True)  # one process, one mean
    truth.backward()
    assert_close_fp32(sum(r["loss"] for r in results), truth)
    assert all(r["count"] == results[0]["count"] for r in results)
    assert_close_fp32(torch.cat([g for r in results for g in r["grads"]]), leaf.grad, "backward")


def test_a_step_with_nothing_supervised_counts_one():
    labels = torch.full((2, 4), IGNORE)
    assert seqloss.num_items_in_batch(labels) == 1
    assert seqloss.smile_loss(torch.randn(2, 4, 5), labels, num_items_in_batch=seqloss.num_items_in_batch(labels)) == 0
