"""The efficient path (impl="torch") against the dense spec (impl="reference"): values and gradients
for every objective, option, reduction, shift and dtype, on awkward shapes; and the engine's promises
(inputs untouched, nothing supervised gives 0, a second backward raises)."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss
from tests.conftest import (IGNORE, MIXTURE, OBJECTIVE_NAMES, assert_close_fp32, assert_low_precision, generator,
                            loss_and_grad, make_labels, make_logits, member_options, random_grad_output)

OBJECTIVES_AND_MIXTURE = OBJECTIVE_NAMES + ("mixture",)
REDUCTIONS = ("mean", "sum", "none", "sequence")


def _objective(name):
    return MIXTURE if name == "mixture" else name


def _options(name, labels, V, seed=0):
    return {} if name == "mixture" else member_options(name, labels, V, seed)


def compare_impls(name, logits, labels, *, grad_output=None, seed=0, **common):
    """Run impl="torch" and impl="reference" on the same fp32 inputs; assert values and gradients match."""
    V = logits.shape[-1]
    results = {}
    for impl in ("torch", "reference"):
        results[impl] = loss_and_grad(seqloss.objective_loss, logits, labels, grad_output=grad_output,
                                      objective=_objective(name), impl=impl, **common,
                                      **_options(name, labels, V, seed))
    (fast, fast_grad), (ref, ref_grad) = results["torch"], results["reference"]
    assert fast.shape == ref.shape
    assert fast.dtype == torch.float32
    assert fast_grad.dtype == logits.dtype and fast_grad.shape == logits.shape
    assert_close_fp32(fast, ref, "forward")
    assert_close_fp32(fast_grad, ref_grad, "backward")
    return fast, fast_grad


def _output_shape(reduction, lead, N):
    return {"mean": (), "sum": (), "none": (*lead, N), "sequence": lead}[reduction]


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
    out_shape = _output_shape(reduction, (B,), N)
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
    common = dict(objective=_objective(name), shift=shift, label_smoothing=label_smoothing, reduction=reduction)

    def run(logits, impl):
        return loss_and_grad(seqloss.objective_loss, logits, labels, grad_output=grad_output, impl=impl,
                             **common, **_options(name, labels, V))

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
        objective, options = _objective(name), _options(name, labels, V)
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


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_extra_leading_dims(name, reduction):
    lead, N, V = (2, 3), 5, 37
    logits = make_logits(*lead, N, V, seed=5)
    labels = make_labels(*lead, N, vocab_size=V, seed=5, ignored_rows=(4,))
    out_shape = _output_shape(reduction, lead, N)
    grad_output = random_grad_output(out_shape) if out_shape else None
    loss, grad = compare_impls(name, logits, labels, reduction=reduction, shift=True, grad_output=grad_output)
    assert tuple(loss.shape) == out_shape
    # ... and equals the same batch with the leading dims flattened.
    flat_options = _options(name, labels.reshape(6, N), V)
    if "include" in flat_options:
        flat_options["include"] = _options(name, labels, V)["include"].reshape(6, -1)
    flat_grad_output = None if grad_output is None else grad_output.reshape(-1, *out_shape[2:])
    flat, flat_grad = loss_and_grad(seqloss.objective_loss, logits.reshape(6, N, V), labels.reshape(6, N),
                                    grad_output=flat_grad_output,
                                    objective=_objective(name), reduction=reduction, shift=True, **flat_options)
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


# --- mixtures ----------------------------------------------------------------------------------


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


def test_subset_int32_candidates_and_labels_equal_int64():
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=17)
    labels = make_labels(B, N, vocab_size=V, seed=17)
    include = torch.randint(-1, V, (B, N, 4), generator=generator(17))
    a = seqloss.subset_cross_entropy(logits, labels, include=include, reduction="none")
    b = seqloss.subset_cross_entropy(logits, labels.int(), include=include.int(), reduction="none")
    assert torch.equal(a, b)
    assert torch.equal(seqloss.smile_loss(logits, labels), seqloss.smile_loss(logits, labels.int()))


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


def test_selective_eos_keeps_eos_where_the_label_is_eos():
    B, N, V, eos = 2, 4, 37, 2
    logits = make_logits(B, N, V, seed=20)
    labels = torch.tensor([[5, 6, eos, IGNORE], [eos, 8, 9, eos]])
    sel = seqloss.selective_eos_loss(logits, labels, eos_token_id=eos, reduction="none")
    mle = seqloss.cross_entropy(logits, labels, reduction="none")
    is_eos = labels == eos
    assert_close_fp32(sel[is_eos], mle[is_eos])
    assert (sel[~is_eos & (labels != IGNORE)] < mle[~is_eos & (labels != IGNORE)]).all()


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
    out = seqloss.objective_loss(base, labels, _objective(name), label_smoothing=0.1, shift=True,
                                 **_options(name, labels, V))
    out.backward()
    contiguous, contiguous_grad = loss_and_grad(seqloss.objective_loss, logits.contiguous(), labels,
                                                objective=_objective(name), label_smoothing=0.1, shift=True,
                                                **_options(name, labels, V))
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
    (3.0 * seqloss.objective_loss(leaf, labels, _objective(name), reduction=reduction,
                                  **_options(name, labels, V))).backward()
    _, grad = loss_and_grad(seqloss.objective_loss, logits, labels, objective=_objective(name),
                            reduction=reduction, impl="reference", **_options(name, labels, V))
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


@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_logits_without_grad(name):
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=28)
    labels = make_labels(B, N, vocab_size=V, seed=28)
    out = seqloss.objective_loss(logits, labels, _objective(name), **_options(name, labels, V))
    assert not out.requires_grad
    with_grad, _ = loss_and_grad(seqloss.objective_loss, logits, labels, objective=_objective(name),
                                 **_options(name, labels, V))
    assert_close_fp32(out, with_grad)
    with torch.no_grad():
        inside = seqloss.objective_loss(logits.clone().requires_grad_(True), labels, _objective(name),
                                        **_options(name, labels, V))
    assert not inside.requires_grad
    assert_close_fp32(inside, with_grad)


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
        objective, options = _objective(name), _options(name, labels, V)
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
    out = seqloss.objective_loss(leaf, labels, _objective(name), shift=shift, reduction=reduction, impl=impl,
                                 label_smoothing=0.1, **_options(name, labels, V))
    out.sum().backward()
    assert tuple(out.shape) == _output_shape(reduction, tuple(labels.shape[:-1]), labels.shape[-1])
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


def test_auto_matches_reference():
    B, N, V = 2, 5, 37
    logits = make_logits(B, N, V, seed=32)
    labels = make_labels(B, N, vocab_size=V, seed=32)
    for name in OBJECTIVES_AND_MIXTURE:
        auto = loss_and_grad(seqloss.objective_loss, logits, labels, objective=_objective(name), impl="auto",
                             **_options(name, labels, V))
        ref = loss_and_grad(seqloss.objective_loss, logits, labels, objective=_objective(name),
                            impl="reference", **_options(name, labels, V))
        assert_close_fp32(auto[0], ref[0])
        assert_close_fp32(auto[1], ref[1], "backward")


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


# --- properties --------------------------------------------------------------------------------

SUBSET_OBJECTIVES = ("smile", "random_subset", "reverse_subset", "selective_eos", "subset")


@st.composite
def batches(draw, min_vocab=1):
    B = draw(st.integers(0, 3))
    N = draw(st.integers(1, 6))
    V = draw(st.integers(min_vocab, 40))
    seed = draw(st.integers(0, 2**16))
    ignore = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return make_logits(B, N, V, seed=seed), make_labels(B, N, vocab_size=V, seed=seed, ignore_fraction=ignore), seed


@settings(max_examples=40, deadline=None)
@given(batch=batches(), name=st.sampled_from(OBJECTIVES_AND_MIXTURE), shift=st.booleans(),
       label_smoothing=st.sampled_from([0.0, 0.1, 0.5]), reduction=st.sampled_from(REDUCTIONS))
def test_property_torch_matches_reference(batch, name, shift, label_smoothing, reduction):
    logits, labels, seed = batch
    if name == "subset" and labels.shape[0] == 0:
        return  # empty batch with candidates: see test_subset_empty_batch
    out_shape = _output_shape(reduction, tuple(labels.shape[:-1]), labels.shape[-1])
    grad_output = random_grad_output(out_shape, seed) if out_shape else None
    compare_impls(name, logits, labels, shift=shift, label_smoothing=label_smoothing, reduction=reduction,
                  grad_output=grad_output, seed=seed)


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
