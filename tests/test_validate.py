"""Every bad input gets a ValueError/TypeError whose message names the argument, whatever the impl;
good edge values pass."""
from __future__ import annotations

import pytest
import torch

import seqloss
from tests.conftest import generator, make_labels, make_logits

B, N, V = 2, 4, 7
LOGITS = make_logits(B, N, V)
LABELS = make_labels(B, N, vocab_size=V)

# (id, call(impl), exception, text that must appear in the message)
BAD_INPUTS = [
    ("labels_ge_V", lambda impl: seqloss.cross_entropy(LOGITS, torch.full((B, N), V), impl=impl),
     ValueError, "labels"),
    ("labels_negative", lambda impl: seqloss.smile_loss(LOGITS, torch.full((B, N), -1), impl=impl),
     ValueError, "labels"),
    ("labels_negative_other_ignore_index",
     lambda impl: seqloss.cross_entropy(LOGITS, torch.full((B, N), -100), ignore_index=-1, impl=impl),
     ValueError, "labels"),
    ("labels_shape", lambda impl: seqloss.cross_entropy(LOGITS, LABELS[:, :-1], impl=impl), ValueError, "labels"),
    ("labels_leading_shape", lambda impl: seqloss.cross_entropy(LOGITS, LABELS.reshape(1, B * N), impl=impl),
     ValueError, "labels"),
    ("integer_logits", lambda impl: seqloss.cross_entropy(LOGITS.long(), LABELS, impl=impl), TypeError, "logits"),
    ("logits_not_a_tensor", lambda impl: seqloss.cross_entropy(LOGITS.tolist(), LABELS, impl=impl),
     TypeError, "logits"),
    ("logits_1d", lambda impl: seqloss.cross_entropy(LOGITS[0, 0], LABELS[0, 0], impl=impl), ValueError, "logits"),
    ("float_labels", lambda impl: seqloss.cross_entropy(LOGITS, LABELS.float(), impl=impl), TypeError, "labels"),
    ("unknown_reduction", lambda impl: seqloss.cross_entropy(LOGITS, LABELS, reduction="avg", impl=impl),
     ValueError, "reduction"),
    ("unknown_objective", lambda impl: seqloss.objective_loss(LOGITS, LABELS, "smyle", impl=impl),
     ValueError, "objective"),
    ("unknown_objective_in_mixture",
     lambda impl: seqloss.objective_loss(LOGITS, LABELS, {"mle": 0.5, "smyle": 0.5}, impl=impl),
     ValueError, "objective"),
    ("objective_wrong_type", lambda impl: seqloss.objective_loss(LOGITS, LABELS, 3, impl=impl),
     TypeError, "objective"),
    ("label_smoothing_one", lambda impl: seqloss.cross_entropy(LOGITS, LABELS, label_smoothing=1.0, impl=impl),
     ValueError, "label_smoothing"),
    ("label_smoothing_negative",
     lambda impl: seqloss.smile_loss(LOGITS, LABELS, label_smoothing=-0.1, impl=impl),
     ValueError, "label_smoothing"),
    ("label_smoothing_nan",
     lambda impl: seqloss.smile_loss(LOGITS, LABELS, label_smoothing=float("nan"), impl=impl),
     ValueError, "label_smoothing"),
    ("num_items_zero", lambda impl: seqloss.cross_entropy(LOGITS, LABELS, num_items_in_batch=0, impl=impl),
     ValueError, "num_items_in_batch"),
    ("num_items_negative_tensor",
     lambda impl: seqloss.cross_entropy(LOGITS, LABELS, num_items_in_batch=torch.tensor(-3), impl=impl),
     ValueError, "num_items_in_batch"),
    ("num_samples_zero", lambda impl: seqloss.random_subset_loss(LOGITS, LABELS, num_samples=0, impl=impl),
     ValueError, "num_samples"),
    ("eos_ge_V", lambda impl: seqloss.selective_eos_loss(LOGITS, LABELS, eos_token_id=V, impl=impl),
     ValueError, "eos_token_id"),
    ("eos_negative", lambda impl: seqloss.selective_eos_loss(LOGITS, LABELS, eos_token_id=-1, impl=impl),
     ValueError, "eos_token_id"),
    ("eos_missing", lambda impl: seqloss.objective_loss(LOGITS, LABELS, "selective_eos", impl=impl),
     TypeError, "eos_token_id"),
    ("smile_exclude_ids_ge_V", lambda impl: seqloss.smile_loss(LOGITS, LABELS, exclude_ids=(0, V), impl=impl),
     ValueError, "exclude_ids"),
    ("reverse_exclude_ids_ge_V", lambda impl: seqloss.reverse_subset_loss(LOGITS, LABELS, exclude_ids=[V + 3],
                                                                          impl=impl),
     ValueError, "exclude_ids"),
    ("random_exclude_ids_negative", lambda impl: seqloss.random_subset_loss(LOGITS, LABELS, exclude_ids=(-1,),
                                                                            impl=impl),
     ValueError, "exclude_ids"),
    ("include_ge_V", lambda impl: seqloss.subset_cross_entropy(LOGITS, LABELS, include=torch.tensor([[0, V], [1, 2]]),
                                                               impl=impl),
     ValueError, "include"),
    ("include_per_position_ge_V",
     lambda impl: seqloss.subset_cross_entropy(LOGITS, LABELS, include=torch.full((B, N, 2), V), impl=impl),
     ValueError, "include"),
    ("include_float", lambda impl: seqloss.subset_cross_entropy(LOGITS, LABELS, include=torch.zeros(B, 2),
                                                                impl=impl),
     TypeError, "include"),
    ("include_shape", lambda impl: seqloss.subset_cross_entropy(LOGITS, LABELS, include=torch.zeros(B + 1, 2).long(),
                                                                impl=impl),
     ValueError, "include"),
    ("exclude_ge_V", lambda impl: seqloss.subset_cross_entropy(LOGITS, LABELS, exclude=torch.tensor([[V], [1]]),
                                                               impl=impl),
     ValueError, "exclude"),
    ("subset_neither", lambda impl: seqloss.subset_cross_entropy(LOGITS, LABELS, impl=impl), ValueError, "include"),
    ("subset_both", lambda impl: seqloss.subset_cross_entropy(LOGITS, LABELS, include=torch.zeros(B, 1).long(),
                                                              exclude=torch.zeros(B, 1).long(), impl=impl),
     ValueError, "exclude"),
    ("negative_mixture_weight",
     lambda impl: seqloss.objective_loss(LOGITS, LABELS, {"mle": -0.1, "smile": 1.1}, impl=impl),
     ValueError, "weight"),
    ("nan_mixture_weight",
     lambda impl: seqloss.objective_loss(LOGITS, LABELS, {"mle": float("nan")}, impl=impl),
     ValueError, "weight"),
    ("empty_mixture", lambda impl: seqloss.objective_loss(LOGITS, LABELS, {}, impl=impl), ValueError, "objective"),
    ("unknown_keyword", lambda impl: seqloss.smile_loss(LOGITS, LABELS, exclude_id=(0,), impl=impl),
     TypeError, r"exclude_id\b"),
    ("keyword_of_another_objective", lambda impl: seqloss.cross_entropy(LOGITS, LABELS, eos_token_id=1, impl=impl),
     TypeError, "eos_token_id"),
    ("generator_wrong_type", lambda impl: seqloss.random_subset_loss(LOGITS, LABELS, generator=0, impl=impl),
     TypeError, "generator"),
    ("shift_not_bool", lambda impl: seqloss.cross_entropy(LOGITS, LABELS, shift=1, impl=impl), TypeError, "shift"),
    ("ignore_index_not_int", lambda impl: seqloss.cross_entropy(LOGITS, LABELS, ignore_index=-100.0, impl=impl),
     TypeError, "ignore_index"),
]


@pytest.mark.parametrize("impl", ["torch", "reference", "auto"])
@pytest.mark.parametrize("call, error, named", [pytest.param(c, e, n, id=i) for i, c, e, n in BAD_INPUTS])
def test_bad_input_names_the_argument(call, error, named, impl):
    with pytest.raises(error, match=named):
        call(impl)


@pytest.mark.parametrize("impl", ["cuda", "Torch", None])
def test_unknown_impl(impl):
    with pytest.raises(ValueError, match="impl"):
        seqloss.cross_entropy(LOGITS, LABELS, impl=impl)


@pytest.mark.parametrize("name", sorted(seqloss.OBJECTIVES))
def test_triton_asked_by_name_raises_rather_than_falls_back(name, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: the kernels cannot run
    options = {"selective_eos": dict(eos_token_id=1), "subset": dict(include=torch.zeros(B, 1, dtype=torch.long))}
    with pytest.raises((ValueError, RuntimeError, ImportError), match="triton"):
        seqloss.objective_loss(LOGITS, LABELS, name, impl="triton", **options.get(name, {}))


GOOD_EDGES = [
    ("labels_V_minus_1", lambda: seqloss.cross_entropy(LOGITS, torch.full((B, N), V - 1))),
    ("ignore_index_inside_vocab", lambda: seqloss.cross_entropy(LOGITS, torch.zeros(B, N, dtype=torch.long),
                                                                ignore_index=0)),
    ("ignore_index_beyond_vocab", lambda: seqloss.cross_entropy(LOGITS, torch.full((B, N), V), ignore_index=V)),
    ("int32_labels", lambda: seqloss.smile_loss(LOGITS, LABELS.int())),
    ("label_smoothing_zero_int", lambda: seqloss.smile_loss(LOGITS, LABELS, label_smoothing=0)),
    ("label_smoothing_almost_one", lambda: seqloss.smile_loss(LOGITS, LABELS, label_smoothing=0.999)),
    ("num_items_float", lambda: seqloss.cross_entropy(LOGITS, LABELS, num_items_in_batch=0.5)),
    ("num_samples_one", lambda: seqloss.random_subset_loss(LOGITS, LABELS, num_samples=1, generator=generator(0))),
    ("eos_V_minus_1", lambda: seqloss.selective_eos_loss(LOGITS, LABELS, eos_token_id=V - 1)),
    ("exclude_ids_tensor", lambda: seqloss.smile_loss(LOGITS, LABELS, exclude_ids=torch.tensor([0, V - 1]))),
    ("exclude_ids_int", lambda: seqloss.reverse_subset_loss(LOGITS, LABELS, exclude_ids=V - 1)),
    ("include_negative_padding", lambda: seqloss.subset_cross_entropy(LOGITS, LABELS,
                                                                      include=torch.full((B, 3), -5))),
    ("mixture_weight_zero", lambda: seqloss.objective_loss(LOGITS, LABELS, {"mle": 0, "smile": 1})),
]


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in GOOD_EDGES])
def test_good_edge_values_pass(call):
    out = call()
    assert torch.isfinite(out).all()


# --- the fused head: linear_loss ---------------------------------------------------------------------

HIDDEN, WEIGHT, BIAS = make_logits(2, 4, 5, seed=16), make_logits(7, 5, seed=17), make_logits(7, seed=18)
LABELS = make_labels(2, 4, vocab_size=7, seed=16)

# (id, arguments replaced, exception, pattern its message must match)
BAD_LINEAR_INPUTS = [
    ("hidden_width_differs", dict(weight=WEIGHT[:, :-1]), ValueError, "weight width 4 .*hidden width 5"),
    ("weight_1d", dict(weight=WEIGHT[0]), ValueError, "weight"),
    ("weight_3d", dict(weight=WEIGHT[None]), ValueError, "weight"),
    ("weight_no_rows", dict(weight=WEIGHT[:0]), ValueError, "weight"),
    ("weight_not_a_tensor", dict(weight=WEIGHT.tolist()), TypeError, "weight"),
    ("weight_dtype", dict(weight=WEIGHT.long()), TypeError, "weight must be floating point"),
    ("bias_wrong_length", dict(bias=BIAS[:-1]), ValueError, "bias"),
    ("bias_2d", dict(bias=BIAS[None]), ValueError, "bias"),
    ("bias_not_a_tensor", dict(bias=BIAS.tolist()), TypeError, "bias"),
    ("bias_dtype", dict(bias=BIAS.long()), TypeError, "bias must be floating point"),
    ("integer_hidden", dict(hidden=HIDDEN.long(), weight=WEIGHT.long()), TypeError, "hidden"),
    ("integer_hidden_float_weight", dict(hidden=HIDDEN.long()), TypeError, "hidden"),
    ("hidden_1d", dict(hidden=HIDDEN[0, 0], labels=LABELS[0, 0]), ValueError, "hidden"),
    ("hidden_not_a_tensor", dict(hidden=HIDDEN.tolist()), TypeError, "hidden"),
    ("labels_shorter_than_hidden", dict(labels=LABELS[:, :-1]), ValueError, "labels.*hidden"),
    ("labels_leading_shape", dict(labels=LABELS.reshape(1, -1)), ValueError, "labels.*hidden"),
    ("labels_ge_V", dict(labels=torch.full_like(LABELS, 7)), ValueError, "labels"),
    ("float_labels", dict(labels=LABELS.float()), TypeError, "labels"),
    ("include_shape", dict(objective="subset", include=torch.zeros(3, 2, dtype=torch.long)), ValueError, "include"),
    ("unknown_keyword", dict(exclude_id=(0,)), TypeError, r"exclude_id\b"),
    ("impl", dict(impl="cuda"), ValueError, "impl"),
]


@pytest.mark.parametrize("impl", ["torch", "reference", "auto", "triton"])
@pytest.mark.parametrize("replaced, error, pattern", [pytest.param(r, e, p, id=i) for i, r, e, p in BAD_LINEAR_INPUTS])
def test_bad_linear_input_names_the_argument(replaced, error, pattern, impl):
    with pytest.raises(error, match=pattern):
        seqloss.linear_loss(**{**dict(hidden=HIDDEN, weight=WEIGHT, labels=LABELS, bias=BIAS, impl=impl), **replaced})


def test_hidden_shape_error_describes_hidden():
    # hidden is (..., N, H): the message must not describe it as logits (..., N, V).
    with pytest.raises(ValueError, match=r"hidden must have shape \(\.\.\., N, H\)"):
        seqloss.linear_loss(HIDDEN[0, 0], WEIGHT, LABELS[0, 0])


# --- the three entries, and devices -------------------------------------------------------------------


def test_the_call_holds_new_tensors_on_the_logits_device():
    # As Hugging Face's ForCausalLMLoss does: labels may come from the data loader's device.
    from seqloss._validate import check_logits_call
    include = torch.zeros(B, 3, dtype=torch.long)
    weights = torch.ones(B, N)
    call = check_logits_call("subset", dict(include=include, token_weights=weights), LOGITS, LABELS)
    assert call.labels.device == LOGITS.device and call.members[0].options["include"].device == LOGITS.device
    assert call.common.token_weights.shape == (B, N)
    assert LABELS.dtype == torch.long and include.shape == (B, 3)  # the caller's tensors untouched


META = torch.device("meta")


@pytest.mark.parametrize("name, call", [
    ("logits", lambda: seqloss.cross_entropy(LOGITS.to(META), LABELS)),
    ("labels", lambda: seqloss.cross_entropy(LOGITS, LABELS.to(META))),
    ("position_ids", lambda: seqloss.cross_entropy(LOGITS, LABELS, position_ids=torch.zeros(B, N, dtype=torch.long,
                                                                                            device=META))),
    ("token_weights", lambda: seqloss.smile_loss(LOGITS, LABELS, token_weights=torch.ones(B, N, device=META))),
    ("class weights", lambda: seqloss.cross_entropy(LOGITS, LABELS, weight=torch.ones(V, device=META))),
    ("include", lambda: seqloss.subset_cross_entropy(LOGITS, LABELS, include=torch.zeros(B, 2, dtype=torch.long,
                                                                                         device=META))),
    ("hidden", lambda: seqloss.linear_loss(torch.randn(B, N, 3, device=META), torch.randn(V, 3), LABELS)),
    ("weight", lambda: seqloss.linear_loss(torch.randn(B, N, 3), torch.randn(V, 3, device=META), LABELS)),
    ("bias", lambda: seqloss.linear_loss(torch.randn(B, N, 3), torch.randn(V, 3), LABELS,
                                         bias=torch.zeros(V, device=META))),
    ("labels", lambda: seqloss.linear_loss(torch.randn(B, N, 3), torch.randn(V, 3), LABELS.to(META))),
    ("weight", lambda: seqloss.sampled_softmax_loss(torch.randn(B, N, 3), torch.randn(V, 3, device=META), LABELS,
                                                    num_negatives=2)),
    ("sampler", lambda: seqloss.sampled_softmax_loss(torch.randn(B, N, 3), torch.randn(V, 3), LABELS,
                                                     num_negatives=2, sampler=torch.ones(V, device=META))),
])
def test_a_tensor_on_the_wrong_device_is_named(name, call):
    # A meta tensor stands for one on another device: a ValueError naming it, never a deep torch error.
    with pytest.raises(ValueError, match=name):
        call()


def test_options_alone_are_checked_against_the_vocabulary():
    # seqloss.hf validates at patch time and the modules when constructed, before any tensor exists.
    from seqloss._validate import check_options
    check_options({"mle": 0.1, "smile": 0.9}, dict(exclude_ids=(3,), shift=True), vocab_size=V)
    with pytest.raises(ValueError, match="exclude_ids"):
        check_options("smile", dict(exclude_ids=(V,)), vocab_size=V)
    with pytest.raises(TypeError, match="unexpected keyword"):
        check_options("mle", dict(exclude_ids=(0,)))


@pytest.mark.parametrize("options, error, named", [
    (dict(token_weights=torch.ones(B, N).long()), TypeError, "token_weights"),
    (dict(token_weights=torch.ones(B, N + 1)), ValueError, "token_weights"),
    (dict(token_weights=torch.full((B, N), -1.0)), ValueError, "token_weights"),
    (dict(token_weights=torch.full((B, N), float("nan"))), ValueError, "token_weights"),
    (dict(token_weights=[1.0] * N), TypeError, "token_weights"),
])
def test_bad_token_weights_are_named(options, error, named):
    with pytest.raises(error, match=named):
        seqloss.smile_loss(LOGITS, LABELS, **options)
