"""The plan as the custom op carries it: flattened to tensors and floats and rebuilt, every field
an engine reads survives."""
from __future__ import annotations

import pytest
import torch

from seqloss._validate import check_linear_call
from seqloss.plan import Plan, plan_of


@pytest.mark.parametrize("exact", [False, True])
def test_a_plan_survives_its_arguments(exact):
    hidden, weight = torch.randn(2, 5, 4), torch.randn(9, 4)
    labels = torch.tensor([[1, 2, -100, 3, 1], [4, 4, 5, -100, 6]])
    call = check_linear_call({"mle": 0.5, "smile": 0.5}, dict(shift=True, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                             return_stats=True, exact_accumulation=exact), hidden, weight, None, labels)
    plan = plan_of(call)
    again = Plan.from_arguments(*plan.arguments())
    assert (again.exact, again.stats, again.scalar, again.softmax) == (exact, True, True, plan.softmax)
    assert len(again.parts) == len(plan.parts)
    for a, b in zip(again.parts, plan.parts):
        assert a.alpha == b.alpha and torch.equal(a.positions, b.positions)
    for a, b in zip((again.labels, again.target_mask, again.coef), (plan.labels, plan.target_mask, plan.coef)):
        assert torch.equal(a, b)
