"""Replacement token detection: Gumbel-max corruption, discriminator labels and ELECTRA's loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqloss.masking as masking

from .helpers import batch, generator, random_batch, scheme

V = 6


def test_mlm_targets():
    item_ids = random_batch(300, 20)
    rtd = scheme("rtd", mask_token_id=50, vocab_size=50)(item_ids, "train", generator=generator(0))
    mlm = scheme("mlm", mask_token_id=50, vocab_size=50)(item_ids, "train", generator=generator(0))
    assert torch.equal(rtd.targets, mlm.targets) and torch.equal(rtd.input_ids, mlm.input_ids)


@pytest.mark.parametrize("sample_from_batch", [False, True])
def test_labels_mark_exactly_the_changed_positions(sample_from_batch):
    item_ids = random_batch(200, 15, vocab_size=V)
    s = scheme("rtd", sample_from_batch=sample_from_batch)
    out = s(item_ids, "train", generator=generator(1))
    T = int(out.target_mask.sum())
    logits = torch.randn(T, T if sample_from_batch else V, generator=generator(2))
    before = (item_ids.clone(), logits.clone())
    corrupted, labels = s.corrupt(item_ids, out, logits, generator=generator(3))
    assert labels.dtype == torch.bool and corrupted.dtype == item_ids.dtype
    assert torch.equal(labels, corrupted != item_ids)
    assert not (labels & ~out.target_mask).any(), "a position that was no target changed"
    assert labels.any() and (labels.sum() < out.target_mask.sum()), "small vocab: some samples equal the item"
    assert (corrupted != 0).sum() == (item_ids != 0).sum(), "padding was sampled or overwritten"
    assert torch.equal(item_ids, before[0]) and torch.equal(logits, before[1])


def test_gumbel_max_samples_the_softmax():
    s = scheme("rtd", mask_token_id=5, vocab_size=V)
    item_ids = batch([1] * 40_000, 1)  # one target per row
    out = s(item_ids, "train", generator=generator(4))
    row = torch.tensor([9.0, 0.0, 1.0, 2.0, 0.5, 9.0])  # ids 0 (padding) and 5 ([MASK]) are never drawn
    corrupted, _ = s.corrupt(item_ids, out, row.expand(40_000, V), generator=generator(5))
    freq = torch.bincount(corrupted.flatten(), minlength=V).float() / 40_000
    expected = torch.cat([torch.zeros(1), row[1:5].softmax(0), torch.zeros(1)])
    assert (freq - expected).abs().max() < 0.01  # s.e. < 0.0025


def test_full_and_selected_logits_agree():
    s = scheme("rtd")
    item_ids = random_batch(50, 10, vocab_size=V)
    out = s(item_ids, "train", generator=generator(6))
    full = torch.randn(50, 10, V, generator=generator(7), requires_grad=True)
    a = s.corrupt(item_ids, out, full, generator=generator(8))
    b = s.corrupt(item_ids, out, full[out.target_mask], generator=generator(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sample_from_batch_draws_the_batch_targets():
    s = scheme("rtd", sample_from_batch=True)
    item_ids = random_batch(100, 10, vocab_size=1000, min_length=2)
    out = s(item_ids, "train", generator=generator(9))
    originals = item_ids[out.target_mask]
    T = len(originals)
    # Each target's scores point at the next target of the batch (cyclically).
    logits = torch.full((T, T), -1e4)
    logits[torch.arange(T), (torch.arange(T) + 1) % T] = 0.0
    corrupted, labels = s.corrupt(item_ids, out, logits, generator=generator(10))
    assert torch.equal(corrupted[out.target_mask], originals.roll(-1))
    assert torch.equal(labels, corrupted != item_ids)


def test_no_targets_no_change():
    s = scheme("rtd")
    item_ids = torch.zeros(3, 4, dtype=torch.long)
    out = s(item_ids, "train")
    corrupted, labels = s.corrupt(item_ids, out, torch.zeros(0, V))
    assert torch.equal(corrupted, item_ids) and not labels.any()


@pytest.mark.parametrize("logits, options, mode, error, words", [
    (torch.zeros(3, V), {}, "train", ValueError, "generator_logits must have shape"),
    (torch.zeros(2, 4, V, dtype=torch.long), {}, "train", TypeError, "generator_logits"),
    (None, {"sample_from_batch": True}, "train", ValueError, "sample_from_batch"),
    (None, {}, "infer", ValueError, "out.target_mask"),
    (torch.zeros(2, 4, 1), {}, "train", ValueError, "none of which may be sampled"),
])
def test_bad_corrupt_calls(logits, options, mode, error, words):
    s = scheme("rtd", **options)
    item_ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    out = s(item_ids, mode, generator=generator(0))
    if logits is None:
        logits = torch.zeros(int(out.target_mask.sum()), V)
    with pytest.raises(error, match=words):
        s.corrupt(item_ids, out, logits)


def test_corrupt_needs_an_output():
    with pytest.raises(TypeError, match="out must be"):
        scheme("rtd").corrupt(torch.ones(1, 2, dtype=torch.long), (None,), torch.zeros(1, V))


def test_electra_loss_is_generator_plus_weighted_bce_over_real_items():
    g = generator(11)
    logits = torch.randn(4, 6, generator=g, requires_grad=True)
    labels = torch.rand(4, 6, generator=g) < 0.3
    real = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [0] * 6])
    gen_loss = torch.tensor(2.5, requires_grad=True)
    loss = masking.electra_loss(gen_loss, logits, labels, real)
    kept = real.bool()
    expected = gen_loss + 50.0 * F.binary_cross_entropy_with_logits(logits[kept], labels[kept].float())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert gen_loss.grad == 1.0 and (logits.grad[~kept] == 0).all()
    torch.testing.assert_close(masking.electra_loss(gen_loss, logits.unsqueeze(-1), labels.float(), real,
                                                    discriminator_weight=1.0),
                               gen_loss + (expected - gen_loss) / 50)


def test_electra_loss_without_real_items_is_the_generator_loss():
    logits = torch.full((2, 3), float("inf"))  # padding logits must not leak, not even as NaN
    loss = masking.electra_loss(torch.tensor(1.0), logits, torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 1.0


@pytest.mark.parametrize("args, error, words", [
    ((1.0, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), TypeError, "generator_loss"),
    ((torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)), ValueError, "generator_loss"),
    ((torch.tensor(0.0), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), ValueError,
     "discriminator_labels"),
    ((torch.tensor(0.0), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3)), ValueError, "attention_mask"),
    ((torch.tensor(0.0), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2, 3)), TypeError,
     "discriminator_logits"),
])
def test_electra_loss_bad_input(args, error, words):
    with pytest.raises(error, match=words):
        masking.electra_loss(*args)


def test_electra_loss_bad_weight():
    with pytest.raises(ValueError, match="discriminator_weight"):
        masking.electra_loss(torch.tensor(0.0), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), -1.0)
