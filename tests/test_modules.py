"""nn.Module wrappers: each forward equals one functional call with the same options."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import seqloss
from tests.conftest import MIXTURE, generator, loss_and_grad, make_labels, make_logits

B, N, V = 3, 6, 37
COMMON = dict(shift=True, label_smoothing=0.1, reduction="sum", num_items_in_batch=None, ignore_index=-100)

# (module, the functional call it must equal)
CASES = [
    ("cross_entropy", lambda: seqloss.CrossEntropyLoss(**COMMON),
     lambda x, y: seqloss.cross_entropy(x, y, **COMMON)),
    ("smile", lambda: seqloss.SmileLoss(exclude_ids=(1,), first_token_mle=False, **COMMON),
     lambda x, y: seqloss.smile_loss(x, y, exclude_ids=(1,), first_token_mle=False, **COMMON)),
    ("random_subset", lambda: seqloss.RandomSubsetLoss(num_samples=3, generator=generator(4), **COMMON),
     lambda x, y: seqloss.random_subset_loss(x, y, num_samples=3, generator=generator(4), **COMMON)),
    ("reverse_subset", lambda: seqloss.ReverseSubsetLoss(exclude_ids=(0,), **COMMON),
     lambda x, y: seqloss.reverse_subset_loss(x, y, exclude_ids=(0,), **COMMON)),
    ("selective_eos", lambda: seqloss.SelectiveEOSLoss(2, **COMMON),
     lambda x, y: seqloss.selective_eos_loss(x, y, eos_token_id=2, **COMMON)),
    ("objective_mixture", lambda: seqloss.ObjectiveLoss(MIXTURE, exclude_ids=(0,), **COMMON),
     lambda x, y: seqloss.objective_loss(x, y, MIXTURE, exclude_ids=(0,), **COMMON)),
    ("objective_name", lambda: seqloss.ObjectiveLoss("reverse_subset", **COMMON),
     lambda x, y: seqloss.reverse_subset_loss(x, y, **COMMON)),
]


@pytest.mark.parametrize("make_module, functional", [pytest.param(m, f, id=i) for i, m, f in CASES])
def test_module_equals_functional(make_module, functional):
    logits = make_logits(B, N, V, seed=1)
    labels = make_labels(B, N, vocab_size=V, seed=1)
    module = make_module()
    assert isinstance(module, nn.Module)
    got, got_grad = loss_and_grad(module, logits, labels)
    want, want_grad = loss_and_grad(functional, logits, labels)
    assert torch.equal(got, want)
    assert torch.equal(got_grad, want_grad)
    assert list(module.parameters()) == []


def test_subset_module_takes_candidates_per_call():
    logits = make_logits(B, N, V, seed=2)
    labels = make_labels(B, N, vocab_size=V, seed=2)
    module = seqloss.SubsetCrossEntropyLoss(reduction="none")
    include = torch.randint(-1, V, (B, N, 4), generator=generator(2))
    exclude = torch.randint(-1, V, (B, 4), generator=generator(3))
    assert torch.equal(module(logits, labels, include=include),
                       seqloss.subset_cross_entropy(logits, labels, include=include, reduction="none"))
    assert torch.equal(module(logits, labels, exclude=exclude),
                       seqloss.subset_cross_entropy(logits, labels, exclude=exclude, reduction="none"))


def test_per_call_options_override_construction_options():
    logits = make_logits(B, N, V, seed=3)
    labels = make_labels(B, N, vocab_size=V, seed=3)
    module = seqloss.SmileLoss(reduction="sum")
    assert module(logits, labels, reduction="none").shape == (B, N)
    assert torch.equal(module(logits, labels, impl="reference"),
                       seqloss.smile_loss(logits, labels, reduction="sum", impl="reference"))


def test_module_options_are_validated_at_construction():
    with pytest.raises(ValueError, match="weight"):
        seqloss.ObjectiveLoss({"mle": -1.0})
    with pytest.raises(TypeError, match="eos_token_id"):
        seqloss.CrossEntropyLoss(eos_token_id=2)
    with pytest.raises(ValueError, match="unknown objective 'smiel'"):
        seqloss.LinearLoss("smiel")
    with pytest.raises(TypeError, match="shfit"):
        seqloss.SmileLoss(shfit=True)
    with pytest.raises(ValueError, match="num_negatives"):
        seqloss.SampledSoftmaxLoss(0)
    with pytest.raises(ValueError, match="sampler"):
        seqloss.SampledSoftmaxLoss(4, sampler="zipf")
    with pytest.raises(TypeError, match="class_weight"):
        seqloss.CrossEntropyLoss(weight=torch.ones(V), class_weight=torch.ones(V))
    with pytest.raises(TypeError, match="exact_accumulation is LinearLoss's"):
        seqloss.SmileLoss(exact_accumulation=True)
    with pytest.raises(TypeError, match="exact_accumulation must be a bool"):
        seqloss.LinearLoss("smile", exact_accumulation=1)


def test_module_class_weights_and_per_call_ids_are_checked_at_the_call():
    module = seqloss.CrossEntropyLoss(weight=torch.ones(V + 1))  # V is known only at the call
    with pytest.raises(ValueError, match="class weights"):
        module(make_logits(B, N, V), make_labels(B, N, vocab_size=V))


def test_module_inside_a_model_trains():
    torch.manual_seed(0)
    head = nn.Linear(8, V)
    loss_fn = seqloss.ObjectiveLoss(MIXTURE, shift=True)
    hidden = torch.randn(B, N, 8)
    labels = make_labels(B, N, vocab_size=V, seed=4)
    loss_fn(head(hidden), labels).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0


def test_repr_shows_the_options():
    assert "exclude_ids=(0,)" in repr(seqloss.SmileLoss(exclude_ids=(0,)))
    assert "eos_token_id=2" in repr(seqloss.SelectiveEOSLoss(2))
    assert repr(seqloss.CrossEntropyLoss()).startswith("CrossEntropyLoss(")


def test_objective_loss_repr_shows_its_objective():
    text = repr(seqloss.ObjectiveLoss(MIXTURE, shift=True))
    assert "shift=True" in text
    assert "smile" in text and "0.99" in text, f"two different ObjectiveLoss print the same: {text}"
