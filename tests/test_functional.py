"""The public function layer (functional.py): leading batch shapes and output shapes, mixtures as weighted
sums, randomness conventions (torch.Generator, the global RNG), id dtypes, autograd integration, the
impl="auto" dispatch, num_items_in_batch, and properties of the objectives seen through the API."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss
from tests.conftest import (
    IGNORE,
    OBJECTIVES_AND_MIXTURE,
    REDUCTIONS,
    assert_close_fp32,
    batches,
    compare_impls,
    generator,
    loss_and_grad,
    make_labels,
    make_logits,
    member_options,
    objective_of,
    options_of,
    output_shape,
    random_grad_output,
)

SUBSET_OBJECTIVES = ("smile", "random_subset", "reverse_subset", "selective_eos", "subset")

# --- leading batch shapes and output shapes --------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_extra_leading_dims(name, reduction):
    lead, N, V = (2, 3), 5, 37
    logits = make_logits(*lead, N, V, seed=5)
    labels = make_labels(*lead, N, vocab_size=V, seed=5, ignored_rows=(4,))
    out_shape = output_shape(reduction, lead, N)
    grad_output = random_grad_output(out_shape) if out_shape else None
    loss, grad = compare_impls(name, logits, labels, reduction=reduction, shift=True, grad_output=grad_output)
    assert tuple(loss.shape) == out_shape
    # ... and equals the same batch with the leading dims flattened.
    flat_options = options_of(name, labels.reshape(6, N), V)
    if "include" in flat_options:
        flat_options["include"] = options_of(name, labels, V)["include"].reshape(6, -1)
    flat_grad_output = None if grad_output is None else grad_output.reshape(-1, *out_shape[2:])
    flat, flat_grad = loss_and_grad(seqloss.objective_loss, logits.reshape(6, N, V), labels.reshape(6, N),
                                    grad_output=flat_grad_output,
                                    objective=objective_of(name), reduction=reduction, shift=True, **flat_options)
    assert_close_fp32(loss.reshape(flat.shape), flat)
    assert_close_fp32(grad.reshape(6, N, V), flat_grad, "backward")


def test_two_dimensional_logits_without_batch_dim():
    N, V = 6, 37
    logits = make_logits(N, V, seed=6)
    labels = make_labels(N, vocab_size=V, seed=6)
    for name in OBJECTIVES_AND_MIXTURE:
        loss, _ = compare_impls(name, logits, labels, reduction="none", grad_output=random_grad_output((N,)))
        assert loss.shape == (N,)
        seq, _ = compare_impls(name, logits, labels, reduction="sequence")
        assert seq.shape == ()


# --- mixtures --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_mixture_is_the_weighted_sum_of_its_members(impl):
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=7)
    labels = make_labels(B, N, vocab_size=V, seed=7)
    mixture = {"mle": 0.01, "smile": 0.99, "reverse_subset": 0.5, "selective_eos": 0.25}
    options = dict(exclude_ids=(3,), eos_token_id=2)
    mix, mix_grad = loss_and_grad(seqloss.objective_loss, logits, labels, objective=mixture, impl=impl,
                                  label_smoothing=0.1, shift=True, **options)
    total, total_grad = 0.0, 0.0
    for name, weight in mixture.items():
        mine = {k: v for k, v in options.items() if k in seqloss.OBJECTIVES[name].options}
        loss, grad = loss_and_grad(seqloss.objective_loss, logits, labels, objective=name, impl=impl,
                                   label_smoothing=0.1, shift=True, **mine)
        total, total_grad = total + weight * loss, total_grad + weight * grad
    assert_close_fp32(mix, total)
    assert_close_fp32(mix_grad, total_grad, "backward")


# --- randomness: torch.Generator and the global RNG ------------------------------------------


def test_random_subset_is_reproducible_with_a_seeded_generator():
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=10)
    labels = make_labels(B, N, vocab_size=V, seed=10)
    runs = [seqloss.random_subset_loss(logits, labels, num_samples=3, generator=generator(5), reduction="none")
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = seqloss.random_subset_loss(logits, labels, num_samples=3, generator=generator(6), reduction="none")
    assert not torch.equal(runs[0], other)


def test_random_subset_global_rng_matches_reference_under_the_same_seed():
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=11)
    labels = make_labels(B, N, vocab_size=V, seed=11)
    outs = []
    for impl in ("torch", "reference"):
        torch.manual_seed(123)
        outs.append(seqloss.random_subset_loss(logits, labels, num_samples=5, impl=impl, reduction="none"))
    assert_close_fp32(outs[0], outs[1])


# --- id dtypes, objective semantics, autograd ------------------------------------------------


def test_subset_int32_candidates_and_labels_equal_int64():
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=17)
    labels = make_labels(B, N, vocab_size=V, seed=17)
    include = torch.randint(-1, V, (B, N, 4), generator=generator(17))
    a = seqloss.subset_cross_entropy(logits, labels, include=include, reduction="none")
    b = seqloss.subset_cross_entropy(logits, labels.int(), include=include.int(), reduction="none")
    assert torch.equal(a, b)
    assert torch.equal(seqloss.smile_loss(logits, labels), seqloss.smile_loss(logits, labels.int()))


def test_selective_eos_keeps_eos_where_the_label_is_eos():
    B, N, V, eos = 2, 4, 37, 2
    logits = make_logits(B, N, V, seed=20)
    labels = torch.tensor([[5, 6, eos, IGNORE], [eos, 8, 9, eos]])
    sel = seqloss.selective_eos_loss(logits, labels, eos_token_id=eos, reduction="none")
    mle = seqloss.cross_entropy(logits, labels, reduction="none")
    is_eos = labels == eos
    assert_close_fp32(sel[is_eos], mle[is_eos])
    assert (sel[~is_eos & (labels != IGNORE)] < mle[~is_eos & (labels != IGNORE)]).all()


@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_logits_without_grad(name):
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=28)
    labels = make_labels(B, N, vocab_size=V, seed=28)
    out = seqloss.objective_loss(logits, labels, objective_of(name), **options_of(name, labels, V))
    assert not out.requires_grad
    with_grad, _ = loss_and_grad(seqloss.objective_loss, logits, labels, objective=objective_of(name),
                                 **options_of(name, labels, V))
    assert_close_fp32(out, with_grad)
    with torch.no_grad():
        inside = seqloss.objective_loss(logits.clone().requires_grad_(True), labels, objective_of(name),
                                        **options_of(name, labels, V))
    assert not inside.requires_grad
    assert_close_fp32(inside, with_grad)


# --- dispatch and Hugging Face conventions ---------------------------------------------------


def test_auto_matches_reference():
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=32)
    labels = make_labels(B, N, vocab_size=V, seed=32)
    for name in OBJECTIVES_AND_MIXTURE:
        auto = loss_and_grad(seqloss.objective_loss, logits, labels, objective=objective_of(name), impl="auto",
                             **options_of(name, labels, V))
        ref = loss_and_grad(seqloss.objective_loss, logits, labels, objective=objective_of(name),
                            impl="reference", **options_of(name, labels, V))
        assert_close_fp32(auto[0], ref[0])
        assert_close_fp32(auto[1], ref[1], "backward")


@pytest.mark.parametrize("path, device, installed, expected", [
    ("linear", "cuda", True, "triton"),   # the fused head on a GPU: the kernels
    ("logits", "cuda", True, "triton"),   # the logits path likewise
    ("sampled", "cuda", True, "torch"),   # sampled softmax: no kernel
    ("linear", "cuda", False, "torch"),   # no Triton
    ("logits", "cpu", True, "torch"),
    ("linear", "cpu", True, "torch"),
])
def test_auto_picks_the_kernels_on_cuda(monkeypatch, path, device, installed, expected):
    monkeypatch.setattr(seqloss.dispatch.kernels, "unavailable_reason", lambda d: None if installed else "no Triton")
    assert seqloss.dispatch.resolve_impl("auto", torch.device(device), path=path) == expected
    assert seqloss.dispatch.resolve_impl("auto", torch.device(device), sharded=True, path=path) == "vocab_parallel"


def test_exact_accumulation_is_a_fused_head_bool():
    hidden, weight = torch.randn(1, 3, 4), torch.randn(5, 4)
    labels = torch.tensor([[1, 2, 3]])
    exact = seqloss.linear_loss(hidden, weight, labels, exact_accumulation=True)
    assert_close_fp32(exact, seqloss.linear_loss(hidden, weight, labels))  # the torch engine: fp32 either way
    with pytest.raises(TypeError, match="exact_accumulation must be a bool"):
        seqloss.linear_loss(hidden, weight, labels, exact_accumulation=1)
    with pytest.raises(TypeError, match="exact_accumulation is an option of the fused head"):
        seqloss.cross_entropy(torch.randn(1, 3, 5), labels, exact_accumulation=True)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_num_items_in_batch_divides_the_sum(impl):
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=33)
    labels = make_labels(B, N, vocab_size=V, seed=33)
    total = seqloss.smile_loss(logits, labels, reduction="sum", impl=impl)
    for k in (7, 7.0, torch.tensor(7), torch.tensor(7.0)):
        mean_k = seqloss.smile_loss(logits, labels, num_items_in_batch=k, impl=impl)
        assert_close_fp32(mean_k, total / 7)
    count = (labels != IGNORE).sum()
    assert_close_fp32(seqloss.smile_loss(logits, labels, impl=impl), total / count)


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(batch=batches(), name=st.sampled_from(SUBSET_OBJECTIVES), shift=st.booleans(),
       impl=st.sampled_from(["torch", "reference"]))
def test_property_subset_loss_never_above_mle(batch, name, shift, impl):
    logits, labels, seed = batch
    if name == "subset" and labels.shape[0] == 0:
        return
    V = logits.shape[-1]
    sub = seqloss.objective_loss(logits, labels, name, shift=shift, impl=impl, reduction="none",
                                 **member_options(name, labels, V, seed))
    mle = seqloss.cross_entropy(logits, labels, shift=shift, impl=impl, reduction="none")
    assert (sub <= mle + 1e-5).all()
