"""``token_weights=``: a (..., N) weight per label position, in the labels' layout — each position's
loss times its weight; ``mean`` divides by the supervised positions' weight sum (or by
``num_items_in_batch``). Against a dense formula written here, and against the reference on every
path: every objective and mixture, shifted or not, packed rows and turns, the torch engines, the
fused head, sampled softmax, class weights, autocast and ``torch.compile``. (The Triton kernels:
tests/kernels/test_token_weights.py.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import seqloss
from tests.conftest import (
    IGNORE,
    OBJECTIVES_AND_MIXTURE,
    REDUCTIONS,
    assert_close_fp32,
    eager_and_compiled,
    generator,
    make_labels,
    make_logits,
    objective_of,
    options_of,
)

B, N, V, H = 3, 7, 23, 6


def weights_like(labels: torch.Tensor, seed: int = 0, zeros: float = 0.2) -> torch.Tensor:
    """Weights in [0, 2) with some exact zeros, in the labels' shape."""
    g = generator(seed + 50_000)
    w = torch.rand(labels.shape, generator=g) * 2
    return torch.where(torch.rand(labels.shape, generator=g) < zeros, torch.zeros_like(w), w)


def _grads(fn, *tensors, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=generator(grad_seed)) if out.dim() else None)
    return out.detach(), [t.grad for t in leaves]


def _same(got, want):
    assert_close_fp32(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert_close_fp32(a, b, "backward")


# --- the definition, written out ---------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mle_with_token_weights_is_the_weighted_cross_entropy(reduction):
    logits = make_logits(B, N, V, seed=1)
    labels = make_labels(B, N, vocab_size=V, seed=1)
    w = weights_like(labels, 1)
    targets = torch.cat([labels[:, 1:], torch.full((B, 1), IGNORE)], 1)      # shift=True: label n+1 at n
    shifted_w = torch.cat([w[:, 1:], torch.zeros(B, 1)], 1)
    nll = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none").view(B, N)
    weighted = nll * shifted_w * (targets != IGNORE)
    want = {"mean": weighted.sum() / (shifted_w * (targets != IGNORE)).sum(), "sum": weighted.sum(),
            "none": weighted}[reduction]
    for impl in ("torch", "reference"):
        got = seqloss.cross_entropy(logits, labels, shift=True, token_weights=w, reduction=reduction, impl=impl)
        assert_close_fp32(got, want)


def test_weights_of_one_change_nothing_and_num_items_in_batch_divides_the_weighted_sum():
    logits, labels = make_logits(B, N, V, seed=2), make_labels(B, N, vocab_size=V, seed=2)
    ones = torch.ones(B, N)
    for name in OBJECTIVES_AND_MIXTURE:
        options = options_of(name, labels, V, seed=2)
        plain = seqloss.objective_loss(logits, labels, objective_of(name), **options)
        options = options_of(name, labels, V, seed=2)
        weighted = seqloss.objective_loss(logits, labels, objective_of(name), token_weights=ones, **options)
        assert_close_fp32(weighted, plain)
    w = weights_like(labels, 2)
    total = seqloss.smile_loss(logits, labels, token_weights=w, reduction="sum")
    assert_close_fp32(seqloss.smile_loss(logits, labels, token_weights=w, num_items_in_batch=5), total / 5)


def test_zero_weights_drop_a_position_but_not_its_label_from_the_smile_set():
    logits = make_logits(1, 4, V, seed=3)
    labels = torch.tensor([[4, 7, 9, 4]])
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    per_position = seqloss.smile_loss(logits, labels, token_weights=w, reduction="none", first_token_mle=False)
    plain = seqloss.smile_loss(logits, labels, reduction="none", first_token_mle=False)
    assert per_position[0, 1] == 0 and torch.equal(per_position[0, [0, 2, 3]], plain[0, [0, 2, 3]])
    assert_close_fp32(seqloss.smile_loss(logits, labels, token_weights=w, first_token_mle=False),
                      plain[0, [0, 2, 3]].mean())
    nothing = seqloss.cross_entropy(logits, labels, token_weights=torch.zeros(1, 4))
    assert nothing == 0 and not torch.isnan(nothing)


def test_the_callers_weights_are_left_as_they_were():
    logits, labels = make_logits(B, N, V, seed=4), make_labels(B, N, vocab_size=V, seed=4)
    w = weights_like(labels, 4)
    before = w.clone()
    seqloss.smile_loss(logits, labels, token_weights=w, shift=True)
    assert torch.equal(w, before)


# --- every objective, reduction and layout, against the reference ------------------------------------


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(OBJECTIVES_AND_MIXTURE), reduction=st.sampled_from(REDUCTIONS),
       shift=st.booleans(), class_weights=st.booleans(), seed=st.integers(0, 2**16),
       lead=st.sampled_from([(3,), (2, 2)]))
def test_token_weights_on_logits_and_the_fused_head_match_the_spec(name, reduction, shift, class_weights, seed, lead):
    labels = make_labels(*lead, N, vocab_size=V, seed=seed, ignore_fraction=0.3)
    logits = make_logits(*lead, N, V, seed=seed)
    hidden = make_logits(*lead, N, H, seed=seed + 1, scale=1.0)
    head = make_logits(V, H, seed=seed + 2, scale=0.5)
    common = dict(shift=shift, reduction=reduction, token_weights=weights_like(labels, seed))
    cw = torch.rand(V, generator=generator(seed)) + 0.5 if class_weights else None
    results = {}
    for impl in ("torch", "reference"):
        results[impl] = _grads(lambda z, impl=impl: seqloss.objective_loss(z, labels, objective_of(name), impl=impl, weight=cw,
                                                                **common, **options_of(name, labels, V, seed)), logits)
    _same(results["torch"], results["reference"])
    for impl in ("torch", "reference"):
        results[impl] = _grads(lambda h, w, impl=impl: seqloss.linear_loss(h, w, labels, objective=objective_of(name), impl=impl,
                                                                class_weight=cw, **common,
                                                                **options_of(name, labels, V, seed)), hidden, head)
    _same(results["torch"], results["reference"])


@pytest.mark.parametrize("turns", [False, True])
@pytest.mark.parametrize("name", ["mle", "smile", "reverse_subset", "mixture"])
def test_a_packed_row_with_weights_equals_its_examples_as_rows(name, turns):
    # Two examples of lengths 4 and 3 packed in one row, against the same examples as two rows.
    labels = make_labels(2, 4, vocab_size=V, seed=6, ignore_fraction=0.0)
    labels[1, 3] = IGNORE
    logits = make_logits(2, 4, V, seed=6)
    w = weights_like(labels, 6, zeros=0.0)
    packed_labels = torch.cat([labels[0], labels[1, :3]]).unsqueeze(0)
    packed_logits = torch.cat([logits[0], logits[1, :3]]).unsqueeze(0)
    packed_w = torch.cat([w[0], w[1, :3]]).unsqueeze(0)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    objective = objective_of(name)
    options = dict(shift=True, reduction="sum", turns=turns)
    rows = seqloss.objective_loss(logits, labels, objective, token_weights=w, **options)
    packed = seqloss.objective_loss(packed_logits, packed_labels, objective, token_weights=packed_w,
                                    position_ids=position_ids, **options)
    assert_close_fp32(packed, rows)
    fused_rows = seqloss.linear_loss(logits, torch.eye(V), labels, objective=objective, token_weights=w, **options)
    assert_close_fp32(fused_rows, rows)


# --- sampled softmax, modules, autocast, compile ------------------------------------------------------


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sampled_softmax_takes_token_weights(share, reduction):
    hidden = make_logits(B, N, H, seed=7, scale=1.0)
    head = make_logits(V, H, seed=8, scale=0.5)
    labels = make_labels(B, N, vocab_size=V, seed=7)
    w = weights_like(labels, 7)
    results = {}
    for impl in ("torch", "reference"):
        results[impl] = _grads(lambda h, e, impl=impl: seqloss.sampled_softmax_loss(
            h, e, labels, num_negatives=5, share_negatives=share, generator=generator(9), impl=impl, shift=True,
            token_weights=w, reduction=reduction), hidden, head)
    _same(results["torch"], results["reference"])
    unweighted = seqloss.sampled_softmax_loss(hidden, head, labels, num_negatives=5, share_negatives=share,
                                              generator=generator(9), shift=True, reduction="none")
    shifted_w = torch.cat([w[:, 1:], torch.zeros(B, 1)], 1)
    if reduction == "none":
        assert_close_fp32(results["torch"][0], unweighted * shifted_w)


def test_modules_take_token_weights_per_call():
    logits, labels = make_logits(B, N, V, seed=10), make_labels(B, N, vocab_size=V, seed=10)
    w = weights_like(labels, 10)
    assert_close_fp32(seqloss.SmileLoss(shift=True)(logits, labels, token_weights=w),
                      seqloss.smile_loss(logits, labels, shift=True, token_weights=w))


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_token_weights_compile_and_run_under_autocast(path):
    logits, labels = make_logits(B, N, V, seed=11), make_labels(B, N, vocab_size=V, seed=11)
    hidden, head = make_logits(B, N, H, seed=12, scale=1.0), make_logits(V, H, seed=13, scale=0.5)
    w = weights_like(labels, 11)
    if path == "logits":
        def fn(z):
            return seqloss.objective_loss(z, labels, {"mle": 0.3, "smile": 0.7}, shift=True, token_weights=w)
        tensors = (logits,)
    else:
        def fn(h, e):
            return seqloss.linear_loss(h, e, labels, objective={"mle": 0.3, "smile": 0.7}, shift=True,
                                       token_weights=w)
        tensors = (hidden, head)
    eager, compiled = eager_and_compiled(_grads, fn, *tensors)
    _same(compiled, eager)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fn(*tensors)
    assert low.dtype == torch.float32 and abs(float(low) - float(eager[0])) < 0.05 * abs(float(eager[0])) + 1e-2
