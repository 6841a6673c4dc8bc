"""The efficient path (impl="torch") against the dense spec (impl="reference"): values and gradients
for every objective, option, reduction, shift and dtype, on awkward shapes and layouts; and the engine's
promises (inputs untouched, nothing supervised gives 0, a second backward raises). The public function
layer (shapes, conventions, dispatch) is tested in test_functional.py."""
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
    assert_low_precision,
    batches,
    compare_impls,
    generator,
    loss_and_grad,
    make_labels,
    make_logits,
    objective_of,
    options_of,
    output_shape,
    random_grad_output,
)

# --- the full grid -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_items_in_batch", [None, 7])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_torch_matches_reference(name, label_smoothing, reduction, shift, num_items_in_batch):
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=1)
    labels = make_labels(B, N, vocab_size=V, seed=1, ignored_rows=(1,))
    out_shape = output_shape(reduction, (B,), N)
    grad_output = random_grad_output(out_shape) if out_shape else None
    loss, _ = compare_impls(name, logits, labels, grad_output=grad_output, shift=shift,
                            label_smoothing=label_smoothing, reduction=reduction,
                            num_items_in_batch=num_items_in_batch)
    assert tuple(loss.shape) == out_shape
    if reduction in ("none", "sequence"):
        assert (loss[1] == 0).all()  # the all-ignored row


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_low_precision_criterion(name, dtype, shift, label_smoothing, reduction):
    B, N, V = 3, 7, 37
    truth_logits = make_logits(B, N, V, seed=2)
    low_logits = truth_logits.to(dtype)
    labels = make_labels(B, N, vocab_size=V, seed=2)
    grad_output = random_grad_output((B, N)) if reduction == "none" else None
    common = dict(objective=objective_of(name), shift=shift, label_smoothing=label_smoothing, reduction=reduction)

    def run(logits, impl):
        return loss_and_grad(seqloss.objective_loss, logits, labels, grad_output=grad_output, impl=impl,
                             **common, **options_of(name, labels, V))

    truth, truth_grad = run(truth_logits, "reference")
    naive, naive_grad = run(low_logits, "reference")
    fast, fast_grad = run(low_logits, "torch")
    assert fast.dtype == torch.float32, "losses are fp32 whatever the logits' dtype"
    assert fast_grad.dtype == dtype, "gradients come back in the logits' dtype"
    assert_low_precision(fast, naive, truth, dtype, "forward")
    assert_low_precision(fast_grad, naive_grad, truth_grad, dtype, "backward")


# --- awkward shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 37), (2, 3, 1003), (3, 1, 37), (1, 2, 1), (4, 3, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_awkward_shapes(name, shape, shift):
    B, N, V = shape
    logits = make_logits(B, N, V, seed=3)
    labels = make_labels(B, N, vocab_size=V, seed=3, ignore_fraction=0.2)
    compare_impls(name, logits, labels, shift=shift, label_smoothing=0.1, reduction="none",
                  grad_output=random_grad_output((B, N)))


@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_many_positions_over_a_large_vocabulary(name):
    # More positions than one chunk of the full-vocabulary pass holds (about 2**18 logits).
    B, N, V = 2, 140, 1003
    logits = make_logits(B, N, V, seed=4)
    labels = make_labels(B, N, vocab_size=V, seed=4, ignore_fraction=0.1)
    compare_impls(name, logits, labels, shift=True, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.9])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE + ("reverse_then_selective_eos",))
def test_mostly_supervised_and_mostly_ignored_batches(name, ignore_fraction, dtype):
    # Whether most positions have a target or few do, every support gives the reference's answer.
    B, N, V = 4, 8, 37
    logits = make_logits(B, N, V, seed=34)
    labels = make_labels(B, N, vocab_size=V, seed=34, ignore_fraction=ignore_fraction)
    if name == "reverse_then_selective_eos":
        objective, options = {"reverse_subset": 0.7, "selective_eos": 0.3}, dict(eos_token_id=2)
    else:
        objective, options = objective_of(name), options_of(name, labels, V)
    grad_output = random_grad_output((B, N))
    results = {}
    for impl, x in (("truth", logits), ("reference", logits.to(dtype)), ("torch", logits.to(dtype))):
        if name == "random_subset":
            options["generator"] = generator(34)
        results[impl] = loss_and_grad(seqloss.objective_loss, x, labels, objective=objective, reduction="none",
                                      impl="reference" if impl == "truth" else impl, label_smoothing=0.1,
                                      grad_output=grad_output, **options)
    if dtype == torch.float32:
        assert_close_fp32(results["torch"][0], results["reference"][0])
        assert_close_fp32(results["torch"][1], results["reference"][1], "backward")
    else:
        for i, which in enumerate(("forward", "backward")):
            assert_low_precision(results["torch"][i], results["reference"][i], results["truth"][i], dtype, which)


# --- mixtures ----------------------------------------------------------------------------------


def test_mixture_with_routed_options_matches_reference():
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=8)
    labels = make_labels(B, N, vocab_size=V, seed=8)
    results = [loss_and_grad(seqloss.objective_loss, logits, labels,
                             objective={"smile": 0.5, "random_subset": 0.3, "selective_eos": 0.2},
                             exclude_ids=(4, 5), eos_token_id=2, num_samples=3, generator=generator(8),
                             first_token_mle=False, impl=impl) for impl in ("torch", "reference")]
    assert_close_fp32(results[0][0], results[1][0])
    assert_close_fp32(results[0][1], results[1][1], "backward")


def test_mixture_weight_zero_contributes_nothing():
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=9)
    labels = make_labels(B, N, vocab_size=V, seed=9)
    a = loss_and_grad(seqloss.objective_loss, logits, labels, objective={"mle": 0.0, "smile": 1.0})
    b = loss_and_grad(seqloss.smile_loss, logits, labels)
    assert_close_fp32(a[0], b[0])
    assert_close_fp32(a[1], b[1], "backward")


# --- random subsetting -------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [1, 50])
def test_random_subset_num_samples(num_samples):
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=12)
    labels = make_labels(B, N, vocab_size=V, seed=12)
    outs = [loss_and_grad(seqloss.random_subset_loss, logits, labels, num_samples=num_samples,
                          generator=generator(1), impl=impl, label_smoothing=0.1) for impl in ("torch", "reference")]
    assert_close_fp32(outs[0][0], outs[1][0])
    assert_close_fp32(outs[0][1], outs[1][1], "backward")


# --- explicit candidates -----------------------------------------------------------------------


def _subset_pair(logits, labels, **kwargs):
    outs = [loss_and_grad(seqloss.subset_cross_entropy, logits, labels, impl=impl, **kwargs)
            for impl in ("torch", "reference")]
    assert_close_fp32(outs[0][0], outs[1][0])
    assert_close_fp32(outs[0][1], outs[1][1], "backward")
    return outs[0]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shift", [False, True])
def test_subset_include_per_position_with_padding_and_duplicates(shift, label_smoothing):
    B, N, V, K = 3, 6, 37, 6
    logits = make_logits(B, N, V, seed=13)
    labels = make_labels(B, N, vocab_size=V, seed=13)
    include = torch.randint(-3, V, (B, N, K), generator=generator(13))
    include[..., 1] = include[..., 0]             # duplicates
    include[0, 2] = -1                            # a position with only padding
    include[1, 3, :2] = labels[1, 3].clamp(min=0)  # the label itself among the candidates
    _subset_pair(logits, labels, include=include, shift=shift, label_smoothing=label_smoothing,
                 reduction="none", grad_output=random_grad_output((B, N)))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shift", [False, True])
def test_subset_include_per_row_with_padding_and_duplicates(shift, label_smoothing):
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=14)
    labels = make_labels(B, N, vocab_size=V, seed=14)
    include = torch.tensor([[5, 5, -1, 7, 30], [-1, -1, -1, -1, -1], [0, 36, 36, -7, 12]])
    _subset_pair(logits, labels, include=include, shift=shift, label_smoothing=label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shift", [False, True])
def test_subset_exclude_per_row(shift, label_smoothing):
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=15)
    labels = make_labels(B, N, vocab_size=V, seed=15)
    exclude = torch.tensor([[5, 5, -1, 7, 30], [-1, -1, -1, -1, -1], [0, 36, 36, -7, 12]])
    exclude[0, 0] = labels[0][labels[0] >= 0][0]  # a label that is excluded stays in its support
    _subset_pair(logits, labels, exclude=exclude, shift=shift, label_smoothing=label_smoothing)


def test_subset_with_no_candidates_is_zero_loss():
    # Support = the label alone: probability 1, loss 0, gradient 0.
    B, N, V = 2, 4, 37
    logits = make_logits(B, N, V, seed=16)
    labels = make_labels(B, N, vocab_size=V, seed=16, ignore_fraction=0.0)
    for include in (torch.empty(B, 0, dtype=torch.long), torch.full((B, 3), -1)):
        loss, grad = _subset_pair(logits, labels, include=include, reduction="none")
        assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-6)
        assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-6)


# --- exclude_ids and labels that are excluded --------------------------------------------------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", ["smile", "random_subset", "reverse_subset"])
def test_exclude_ids(name, label_smoothing):
    B, N, V = 3, 6, 37
    logits = make_logits(B, N, V, seed=18)
    labels = make_labels(B, N, vocab_size=V, seed=18)
    exclude_ids = (0, 3, 3, int(labels[labels >= 0][0]))  # one of them is a label; a repeat
    outs = []
    for impl in ("torch", "reference"):
        options = dict(exclude_ids=exclude_ids, impl=impl, label_smoothing=label_smoothing, reduction="none")
        if name == "random_subset":
            options.update(num_samples=8, generator=generator(18))
        outs.append(loss_and_grad(seqloss.objective_loss, logits, labels, objective=name, **options,
                                  grad_output=random_grad_output((B, N))))
    assert_close_fp32(outs[0][0], outs[1][0])
    assert_close_fp32(outs[0][1], outs[1][1], "backward")


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("name", ["smile", "random_subset", "reverse_subset", "selective_eos", "subset"])
def test_label_equal_to_an_excluded_id_has_finite_loss(name, impl):
    B, N, V = 2, 5, 37
    labels = torch.full((B, N), 9)
    labels[:, 0] = 4  # SMILE's first token: full vocabulary
    logits = make_logits(B, N, V, seed=19)
    options = {"smile": dict(exclude_ids=(9,)), "random_subset": dict(exclude_ids=(9,), generator=generator(0)),
               "reverse_subset": dict(exclude_ids=(9,)), "selective_eos": dict(eos_token_id=9),
               "subset": dict(exclude=torch.full((B, 2), 9))}[name]
    loss, grad = loss_and_grad(seqloss.objective_loss, logits, labels, objective=name, impl=impl,
                               reduction="none", label_smoothing=0.1, **options)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert (loss[:, 1:] >= 0).all()


# --- layouts, gradients, autograd --------------------------------------------------------------


def _views(B, N, V):
    transposed = make_logits(B, V, N, seed=21).transpose(1, 2)            # strides over N and V swapped
    sliced = make_logits(B, N, V + 3, seed=22)[..., 1:V + 1]               # a window of the vocabulary
    strided = make_logits(B, 2 * N, V, seed=23)[:, ::2]                    # every other position
    return {"transposed": transposed, "sliced": sliced, "strided": strided}


@pytest.mark.parametrize("view", ["transposed", "sliced", "strided"])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_non_contiguous_logits(name, view):
    B, N, V = 2, 5, 37
    logits = _views(B, N, V)[view]
    assert not logits.is_contiguous()
    labels = make_labels(B, N, vocab_size=V, seed=24)
    base = logits.detach().clone().requires_grad_(True)  # keeps the strides; grads flow to the view
    out = seqloss.objective_loss(base, labels, objective_of(name), label_smoothing=0.1, shift=True,
                                 **options_of(name, labels, V))
    out.backward()
    contiguous, contiguous_grad = loss_and_grad(seqloss.objective_loss, logits.contiguous(), labels,
                                                objective=objective_of(name), label_smoothing=0.1, shift=True,
                                                **options_of(name, labels, V))
    assert_close_fp32(out.detach(), contiguous)
    assert_close_fp32(base.grad, contiguous_grad, "backward")
    compare_impls(name, logits, labels, label_smoothing=0.1, shift=True)


def test_non_contiguous_view_of_a_leaf_gets_its_gradient():
    B, N, V = 2, 5, 37
    leaf = make_logits(B, V, N, seed=25).requires_grad_(True)
    labels = make_labels(B, N, vocab_size=V, seed=25)
    seqloss.smile_loss(leaf.transpose(1, 2), labels).backward()
    _, expected = loss_and_grad(seqloss.smile_loss, leaf.detach().transpose(1, 2).contiguous(), labels,
                                impl="reference")
    assert_close_fp32(leaf.grad.transpose(1, 2), expected, "backward")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_scaled_scalar_loss(name, reduction):
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=26)
    labels = make_labels(B, N, vocab_size=V, seed=26)
    leaf = logits.clone().requires_grad_(True)
    (3.0 * seqloss.objective_loss(leaf, labels, objective_of(name), reduction=reduction,
                                  **options_of(name, labels, V))).backward()
    _, grad = loss_and_grad(seqloss.objective_loss, logits, labels, objective=objective_of(name),
                            reduction=reduction, impl="reference", **options_of(name, labels, V))
    assert_close_fp32(leaf.grad, 3.0 * grad, "backward")


def test_loss_used_twice_in_a_graph_accumulates():
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=27)
    labels = make_labels(B, N, vocab_size=V, seed=27)
    leaf = logits.clone().requires_grad_(True)
    loss = seqloss.smile_loss(leaf, labels, reduction="none")
    (loss.sum() + 2 * loss[0].sum()).backward()
    go = torch.ones(B, N)
    go[0] = 3.0
    _, expected = loss_and_grad(seqloss.smile_loss, logits, labels, reduction="none", grad_output=go,
                                impl="reference")
    assert_close_fp32(leaf.grad, expected, "backward")


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE + ("subset_per_position", "subset_exclude"))
def test_inputs_are_never_modified(name, impl):
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=29).requires_grad_(True)
    labels = make_labels(B, N, vocab_size=V, seed=29)
    if name == "subset_per_position":
        objective, options = "subset", dict(include=torch.randint(-2, V, (B, N, 4), generator=generator(29)))
    elif name == "subset_exclude":
        objective, options = "subset", dict(exclude=torch.randint(-2, V, (B, 4), generator=generator(29)))
    else:
        objective, options = objective_of(name), options_of(name, labels, V)
    before = {k: v.clone() for k, v in options.items() if isinstance(v, torch.Tensor)}
    logits_before, labels_before = logits.detach().clone(), labels.clone()
    out = seqloss.objective_loss(logits, labels, objective, impl=impl, shift=True, label_smoothing=0.1,
                                 reduction="none", **options)
    out.backward(random_grad_output(out.shape))
    assert torch.equal(logits.detach(), logits_before)
    assert torch.equal(labels, labels_before)
    for key, value in before.items():
        assert torch.equal(options[key], value), key


def _nothing_supervised_cases(V):
    yield "all_ignored", make_logits(2, 4, V, seed=30), torch.full((2, 4), IGNORE), False
    yield "empty_batch", make_logits(0, 4, V, seed=30), torch.empty(0, 4, dtype=torch.long), False
    yield "shift_one_position", make_logits(3, 1, V, seed=30), torch.tensor([[1], [2], [3]]), True


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name, case", [
    (name, case) for name in OBJECTIVES_AND_MIXTURE for case in ("all_ignored", "empty_batch", "shift_one_position")
    if (name, case) != ("subset", "empty_batch")  # candidates of an empty batch: test_subset_empty_batch
])
def test_nothing_supervised_gives_exact_zero(name, case, reduction, impl):
    V = 37
    _, logits, labels, shift = next(c for c in _nothing_supervised_cases(V) if c[0] == case)
    leaf = logits.clone().requires_grad_(True)
    out = seqloss.objective_loss(leaf, labels, objective_of(name), shift=shift, reduction=reduction, impl=impl,
                                 label_smoothing=0.1, **options_of(name, labels, V))
    out.sum().backward()
    assert tuple(out.shape) == output_shape(reduction, tuple(labels.shape[:-1]), labels.shape[-1])
    assert (out.detach() == 0).all() and not out.isnan().any()
    assert leaf.grad is not None and leaf.grad.shape == logits.shape
    assert (leaf.grad == 0).all()


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_second_backward_through_the_same_loss_raises(impl):
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=31).requires_grad_(True)
    labels = make_labels(B, N, vocab_size=V, seed=31)
    loss = seqloss.smile_loss(logits, labels, impl=impl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


# --- properties --------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(batch=batches(), name=st.sampled_from(OBJECTIVES_AND_MIXTURE), shift=st.booleans(),
       label_smoothing=st.sampled_from([0.0, 0.1, 0.5]), reduction=st.sampled_from(REDUCTIONS))
def test_property_torch_matches_reference(batch, name, shift, label_smoothing, reduction):
    logits, labels, seed = batch
    if name == "subset" and labels.shape[0] == 0:
        return  # empty batch with candidates: see test_subset_empty_batch
    out_shape = output_shape(reduction, tuple(labels.shape[:-1]), labels.shape[-1])
    grad_output = random_grad_output(out_shape, seed) if out_shape else None
    compare_impls(name, logits, labels, shift=shift, label_smoothing=label_smoothing, reduction=reduction,
                  grad_output=grad_output, seed=seed)


def test_subset_empty_batch():
    V = 37
    logits = make_logits(0, 4, V).requires_grad_(True)
    labels = torch.empty(0, 4, dtype=torch.long)
    for options in (dict(include=torch.empty(0, 3, dtype=torch.long)),
                    dict(include=torch.empty(0, 4, 3, dtype=torch.long)),
                    dict(exclude=torch.empty(0, 3, dtype=torch.long))):
        out = seqloss.subset_cross_entropy(logits, labels, **options)
        out.backward()
        assert out.item() == 0 and (logits.grad == 0).all()
