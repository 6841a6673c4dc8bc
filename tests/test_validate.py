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
