"""Masked LM: calibrated Bernoulli targets, 80/10/10 corruption, embedding-level hiding, the infer slot."""
from __future__ import annotations

import pytest
import torch

import seqloss.masking as masking
from seqloss.masking.mlm import calibrated_rates

from .helpers import batch, generator, lengths_of, random_batch, scheme

VOCAB, MASK = 40, 40  # ids 0..39 with padding 0, and [MASK] as an extra id


@pytest.mark.parametrize("probability", [0.15, 0.4])
@pytest.mark.parametrize("length", [7, 10, 20, 50])
def test_mean_rate_matches_probability(probability, length):
    """Rows long enough to expect one target (probability * n >= 1, true of every case here) get
    exactly the rate `probability`, not more."""
    item_ids = batch([length] * 20_000, length)
    out = scheme("mlm", probability=probability)(item_ids, "train", generator=generator(length))
    rate = out.target_mask.float().mean().item()
    # 20k rows: the standard error of the rate is < 0.002
    assert abs(rate - probability) < 0.006, rate


@pytest.mark.parametrize("length", [2, 3, 5, 6])
def test_short_rows_get_exactly_one_target(length):
    """0.15 * n < 1: the fewest targets the promise allows, not Transformers4Rec's 32% at length 5."""
    item_ids = batch([length] * 2000, length)
    out = scheme("mlm")(item_ids, "train", generator=generator(0))
    assert (out.target_mask.sum(dim=1) == 1).all()


def test_calibration_solves_the_expected_count():
    q = calibrated_rates(0.15, 60)
    n = torch.arange(61, dtype=torch.float64)
    expected = n * q + (1 - q) ** n - q ** n
    long = n >= 1 / 0.15
    torch.testing.assert_close(expected[long], 0.15 * n[long])
    assert (q[~long] == 0).all()


def test_targets_are_uniform_over_positions():
    item_ids = batch([30] * 20_000, 30)
    per_position = scheme("mlm")(item_ids, "train", generator=generator(1)).target_mask.float().mean(dim=0)
    assert (per_position - 0.15).abs().max() < 0.015


def test_mixed_lengths_targets_stay_inside_rows():
    item_ids = random_batch(5000, 25)
    out = scheme("mlm")(item_ids, "train", generator=generator(2))
    n = lengths_of(item_ids)
    assert not (out.target_mask & (item_ids == 0)).any()
    assert (out.target_mask.sum(1)[n >= 1] >= 1).all() and (out.target_mask.sum(1)[n >= 2] < n[n >= 2]).all()


def test_embedding_level_hiding_hides_every_target():
    item_ids = random_batch(500, 20)
    out = scheme("mlm")(item_ids, "train", generator=generator(3))
    assert torch.equal(out.input_mask, out.target_mask) and torch.equal(out.input_ids, item_ids)


def test_id_level_corruption_80_10_10():
    item_ids = batch([50] * 4000, 50, vocab_size=VOCAB)
    out = scheme("mlm", mask_token_id=MASK, vocab_size=VOCAB)(item_ids, "train", generator=generator(4))
    t = out.target_mask
    masked = out.input_ids == MASK
    changed = (out.input_ids != item_ids) & ~masked
    kept = t & (out.input_ids == item_ids)
    assert torch.equal(out.input_mask, masked) and not (masked & ~t).any() and not (changed & ~t).any()
    total = t.sum().item()  # ~30k targets: standard errors < 0.003
    assert abs(masked.sum().item() / total - 0.8) < 0.01
    # Random ids come from the 39 ids besides padding, so 1 in 39 equals the original item.
    assert abs(changed.sum().item() / total - 0.1 * 38 / 39) < 0.008
    assert abs(kept.sum().item() / total - (0.1 + 0.1 / 39)) < 0.008


def test_random_ids_avoid_padding_and_mask():
    item_ids = batch([20] * 2000, 20, vocab_size=6, padding_idx=2)
    s = scheme("mlm", padding_idx=2, mask_token_id=4, vocab_size=6, replace_probability=0.0, random_probability=1.0)
    out = s(item_ids, "train", generator=generator(5))
    drawn = out.input_ids[out.target_mask]
    counts = torch.bincount(drawn, minlength=6)
    assert counts[2] == 0 and counts[4] == 0 and (drawn < 6).all()
    assert (counts[[0, 1, 3, 5]].float() / len(drawn) - 0.25).abs().max() < 0.03  # uniform over the rest


def test_eval_hides_the_last_item_with_mask_id():
    item_ids = torch.tensor([[4, 5, 6, 0], [7, 0, 0, 0], [1, 2, 3, 4]])
    out = scheme("mlm", mask_token_id=MASK, vocab_size=VOCAB)(item_ids, "eval")
    x = -100
    assert out.targets.tolist() == [[x, x, 6, x], [x, x, x, x], [x, x, x, 4]]
    assert out.input_ids.tolist() == [[4, 5, MASK, 0], [7, 0, 0, 0], [1, 2, 3, MASK]]
    assert torch.equal(out.input_mask, out.target_mask)


def test_eval_every_next_item_uses_the_causal_layout():
    item_ids = random_batch(100, 8)
    out = scheme("mlm", eval_on_last_item_only=False)(item_ids, "eval")
    expected = scheme("clm", eval_on_last_item_only=False)(item_ids, "eval")
    assert torch.equal(out.targets, expected.targets) and not out.input_mask.any()


def test_infer_slot_holds_the_mask_id():
    item_ids = torch.tensor([[4, 5, 0], [1, 2, 3], [0, 0, 0]])
    out = scheme("mlm", mask_token_id=MASK, vocab_size=VOCAB)(item_ids, "infer")
    assert out.input_ids.tolist() == [[4, 5, MASK, 0], [1, 2, 3, MASK], [MASK, 0, 0, 0]]
    assert torch.equal(out.input_mask, out.input_ids == MASK)


def test_mask_embedding_swaps_hidden_positions():
    torch.manual_seed(0)
    layer = masking.MaskEmbedding(8)
    embeddings = torch.randn(2, 3, 8)
    hidden = torch.tensor([[True, False, False], [False, False, True]])
    out = layer(embeddings, hidden)
    assert torch.equal(out[~hidden], embeddings[~hidden])
    assert torch.equal(out[hidden], layer.weight.detach().expand(2, 8))
    out.sum().backward()
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, torch.full((8,), 2.0))
    assert layer(embeddings.half(), hidden).dtype == torch.float16
    with pytest.raises(ValueError, match="input_mask"):
        layer(embeddings, hidden.long())
    with pytest.raises(ValueError, match="embeddings"):
        layer(embeddings[..., :4], hidden)
