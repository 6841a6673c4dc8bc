"""Promises every scheme keeps: the output contract, edge rows, seeding, immutability, input checks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss.masking as masking
from seqloss.masking.common import IGNORE_INDEX

from .helpers import SCHEME_NAMES, batch, batches, generator, lengths_of, random_batch, scheme

MODES = ("train", "eval", "infer")
SLOT_SCHEMES = ("mlm", "plm", "rtd")  # append a prediction slot in infer mode


def check_contract(name: str, mode: str, item_ids: torch.Tensor, out: masking.MaskingOutput) -> None:
    B, L = item_ids.shape
    width = L + 1 if mode == "infer" and name in SLOT_SCHEMES else L
    assert out.targets.shape == out.target_mask.shape == out.input_ids.shape == out.input_mask.shape == (B, width)
    assert out.targets.dtype == torch.long
    assert out.target_mask.dtype == out.input_mask.dtype == torch.bool
    assert out.input_ids.dtype == item_ids.dtype
    assert torch.equal(out.target_mask, out.targets != IGNORE_INDEX)
    assert out.input_ids.data_ptr() != item_ids.data_ptr() or item_ids.numel() == 0
    if name == "plm":
        assert out.perm_mask.shape == out.target_mapping.shape == (B, width, width)
        assert out.perm_mask.dtype == out.target_mapping.dtype == torch.float32
    else:
        assert out.perm_mask is None and out.target_mapping is None


@settings(max_examples=40, deadline=None)
@given(data=batches(), name=st.sampled_from(SCHEME_NAMES), seed=st.integers(0, 1000))
def test_train_targets_some_but_not_all(data, name, seed):
    item_ids, pad = data
    out = scheme(name, pad)(item_ids, "train", generator=generator(seed))
    check_contract(name, "train", item_ids, out)
    n, count = lengths_of(item_ids, pad), out.target_mask.sum(dim=1)
    assert not (out.target_mask & (item_ids == pad)).any(), "a padding position has a target"
    if name == "clm":
        assert torch.equal(count, (n - 1).clamp(min=0))
    else:
        assert torch.equal(out.targets[out.target_mask], item_ids[out.target_mask].long())
        assert (count[n >= 1] >= 1).all(), "a non-empty row has no target"
        assert (count[n >= 2] < n[n >= 2]).all(), "every item of a row is a target"


@settings(max_examples=40, deadline=None)
@given(data=batches(), name=st.sampled_from(SCHEME_NAMES), last_only=st.booleans())
def test_eval_last_item_or_every_next_item(data, name, last_only):
    item_ids, pad = data
    out = scheme(name, pad, eval_on_last_item_only=last_only)(item_ids, "eval")
    check_contract(name, "eval", item_ids, out)
    n = lengths_of(item_ids, pad)
    expected_count = torch.where(n >= 2, 1, 0) if last_only else (n - 1).clamp(min=0)
    assert torch.equal(out.target_mask.sum(dim=1), expected_count)
    rows = (n >= 2).nonzero().flatten()
    if last_only:  # the target is the last item, wherever the scheme puts it
        assert torch.equal(out.targets[rows].max(dim=1).values, item_ids[rows, n[rows] - 1].long())


@settings(max_examples=40, deadline=None)
@given(data=batches(), name=st.sampled_from(SCHEME_NAMES))
def test_infer_leaves_items_and_has_no_targets(data, name):
    item_ids, pad = data
    out = scheme(name, pad)(item_ids, "infer")
    check_contract(name, "infer", item_ids, out)
    B, L = item_ids.shape
    assert not out.target_mask.any()
    if name in SLOT_SCHEMES:
        # Exactly one slot per row, right after its last item; the items themselves untouched.
        slot = out.input_mask.nonzero()
        assert torch.equal(slot[:, 0], torch.arange(B)) and torch.equal(slot[:, 1], lengths_of(item_ids, pad))
        assert torch.equal(out.input_ids[~out.input_mask].reshape(B, L), item_ids)
    else:
        assert torch.equal(out.input_ids, item_ids) and not out.input_mask.any()


@pytest.mark.parametrize("name", SCHEME_NAMES)
@pytest.mark.parametrize("mode", MODES)
def test_edge_rows(name, mode):
    """All-padding, 1-item and full rows together, an all-padding batch, and empty shapes."""
    for item_ids in (batch([0, 1, 2, 7, 7], 7), torch.zeros(3, 5, dtype=torch.long),
                     torch.zeros(0, 4, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        out = scheme(name)(item_ids, mode, generator=generator(0))
        check_contract(name, mode, item_ids, out)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8])
def test_integer_dtypes(dtype):
    item_ids = random_batch(8, 10, vocab_size=30).to(dtype)
    for name in SCHEME_NAMES:
        for mode in MODES:
            check_contract(name, mode, item_ids, scheme(name)(item_ids, mode, generator=generator(0)))


@pytest.mark.parametrize("name", SCHEME_NAMES)
def test_seeded_generator_reproduces_and_inputs_stay(name):
    item_ids = random_batch(64, 20, vocab_size=100)
    before = item_ids.clone()
    options = dict(mask_token_id=100, vocab_size=101) if name in ("mlm", "rtd") else {}
    s = scheme(name, **options)
    for mode in MODES:
        first, second = (s(item_ids, mode, generator=generator(7)) for _ in range(2))
        for field in dataclasses.fields(first):
            a, b = getattr(first, field.name), getattr(second, field.name)
            assert (a is None and b is None) or torch.equal(a, b), field.name
    if name != "clm":
        other = s(item_ids, "train", generator=generator(8))
        assert not torch.equal(other.target_mask, s(item_ids, "train", generator=generator(7)).target_mask)
    assert torch.equal(item_ids, before)


def test_global_rng_when_no_generator():
    item_ids = random_batch(64, 20)
    torch.manual_seed(3)
    first = scheme("mlm")(item_ids).target_mask
    torch.manual_seed(3)
    assert torch.equal(first, scheme("mlm")(item_ids).target_mask)


@pytest.mark.parametrize("alias, cls", [("clm", masking.CausalLM), ("causal", masking.CausalLM),
                                        ("mlm", masking.MaskedLM), ("masked", masking.MaskedLM),
                                        ("plm", masking.PermutationLM), ("permutation", masking.PermutationLM),
                                        ("rtd", masking.ReplacementTokenDetection),
                                        ("replacement", masking.ReplacementTokenDetection)])
def test_get_names(alias, cls):
    s = masking.get(alias, padding_idx=2)
    assert type(s) is cls and s.padding_idx == 2
    assert cls.__name__ in repr(s)


@pytest.mark.parametrize("call, error, words", [
    (lambda: masking.get("bert"), ValueError, "unknown masking scheme"),
    (lambda: masking.get(3), TypeError, "name"),
    (lambda: masking.get("clm", probability=0.2), TypeError, "probability"),
    (lambda: masking.get("mlm", probability=0.0), ValueError, "probability"),
    (lambda: masking.get("mlm", probability=1.0), ValueError, "probability"),
    (lambda: masking.get("plm", probability=1.5), ValueError, "probability"),
    (lambda: masking.get("plm", probability="0.2"), TypeError, "probability"),
    (lambda: masking.get("mlm", mask_token_id=0, vocab_size=10), ValueError, "mask_token_id"),
    (lambda: masking.get("rtd", padding_idx=4, mask_token_id=4, vocab_size=10), ValueError, "mask_token_id"),
    (lambda: masking.get("mlm", mask_token_id=5), ValueError, "vocab_size"),
    (lambda: masking.get("mlm", mask_token_id=1, vocab_size=2), ValueError, "vocab_size"),
    (lambda: masking.get("mlm", replace_probability=0.8, random_probability=0.3), ValueError, "random_probability"),
    (lambda: masking.get("mlm", replace_probability=-0.1), ValueError, "replace_probability"),
    (lambda: masking.get("plm", max_span_length=0), ValueError, "max_span_length"),
    (lambda: masking.get("plm", permute_all=1), TypeError, "permute_all"),
    (lambda: masking.get("clm", padding_idx=-1), ValueError, "padding_idx"),
    (lambda: masking.get("clm", train_on_last_item_only="yes"), TypeError, "train_on_last_item_only"),
    (lambda: masking.get("rtd", sample_from_batch=None), TypeError, "sample_from_batch"),
    (lambda: masking.MaskEmbedding(0), ValueError, "hidden_size"),
])
def test_bad_options(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("name", SCHEME_NAMES)
@pytest.mark.parametrize("item_ids, mode, generator_, error, words", [
    (torch.ones(3, dtype=torch.long), "train", None, ValueError, r"item_ids must have shape \(B, L\)"),
    (torch.ones(2, 3, 4, dtype=torch.long), "train", None, ValueError, "item_ids"),
    (torch.ones(2, 3), "train", None, TypeError, "item_ids must hold integer"),
    (torch.ones(2, 3, dtype=torch.bool), "train", None, TypeError, "item_ids must hold integer"),
    ([[1, 2, 0]], "train", None, TypeError, "item_ids must be a torch.Tensor"),
    (torch.tensor([[1, -2, 0]]), "train", None, ValueError, "non-negative"),
    (torch.tensor([[1, 2, 3], [0, 0, 4]]), "train", None, ValueError, "right-padded: row 1"),
    (torch.tensor([[1, 0, 3]]), "eval", None, ValueError, "right-padded"),
    (torch.tensor([[1, 2, 0]]), "test", None, ValueError, "mode must be one of"),
    (torch.tensor([[1, 2, 0]]), None, None, ValueError, "mode"),
    (torch.tensor([[1, 2, 0]]), "train", 42, TypeError, "generator"),
])
def test_bad_calls(name, item_ids, mode, generator_, error, words):
    with pytest.raises(error, match=words):
        scheme(name)(item_ids, mode, generator=generator_)


def test_padding_idx_other_than_zero():
    item_ids = torch.tensor([[0, 5, 0, 9, 9], [2, 9, 9, 9, 9]])  # 9 pads, so 0 is an item here
    out = scheme("clm", padding_idx=9)(item_ids, "train")
    assert out.targets.tolist() == [[5, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 5]
    out = scheme("mlm", padding_idx=9)(item_ids, "infer")
    assert out.input_ids.tolist() == [[0, 5, 0, 9, 9, 9], [2, 9, 9, 9, 9, 9]]
    assert out.input_mask.nonzero()[:, 1].tolist() == [3, 1]
