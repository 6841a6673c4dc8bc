"""DataCollator: padding, labels in each model family's convention, eval examples, seeds, errors, and a
model trained and evaluated through ``transformers.Trainer``."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss.masking as masking
from seqloss.masking import DataCollator
from tests.masking.helpers import generator

MASK, V = 1, 30
OPTIONS = {"mlm": dict(mask_token_id=MASK, vocab_size=V), "clm": {}, "plm": {}}


def examples(lengths, seed=0):
    g = generator(seed)
    return [{"input_ids": torch.randint(2, V, (n,), generator=g).tolist()} for n in lengths]


def padded(features):
    L = max(len(f["input_ids"]) for f in features)
    return torch.tensor([f["input_ids"] + [0] * (L - len(f["input_ids"])) for f in features])


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda x: max(x) > 0),
       name=st.sampled_from(sorted(OPTIONS)), seed=st.integers(0, 100))
def test_a_batch_is_the_scheme_on_the_padded_items(lengths, name, seed):
    features = examples(lengths, seed)
    batch = DataCollator(name, seed=seed, **OPTIONS[name])(features)
    out = masking.get(name, **OPTIONS[name])(padded(features), "train", generator=torch.Generator().manual_seed(seed))
    lengths_t = torch.tensor(lengths)
    assert torch.equal(batch["attention_mask"], (torch.arange(max(lengths)) < lengths_t.unsqueeze(1)).long())
    assert torch.equal(batch["input_ids"], out.input_ids)
    if name == "clm":  # unshifted: the label of the prediction after item i sits at i + 1
        assert torch.equal(batch["labels"][:, 1:], out.targets[:, :-1])
        assert (batch["labels"][:, 0] == -100).all()
    else:
        assert torch.equal(batch["labels"], out.targets)
    if name == "plm":
        assert torch.equal(batch["perm_mask"], out.perm_mask)
        assert torch.equal(batch["target_mapping"], out.target_mapping)
    else:
        assert "perm_mask" not in batch


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_eval_examples_carry_eval_mode_targets_and_are_only_padded(name):
    features = examples([5, 1, 3, 0, 7])
    collator = DataCollator(name, **OPTIONS[name])
    eval_examples = collator.eval_examples(features)
    assert [len(e["labels"]) for e in eval_examples] == [5, 1, 3, 0, 7]
    batch = collator(eval_examples)
    scheme = masking.get(name, **OPTIONS[name])
    out = scheme(padded(features), "eval")
    expected = DataCollator(name, mode="eval", **OPTIONS[name])(features)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert torch.equal(batch["input_ids"], out.input_ids)
    if name == "plm":
        assert torch.equal(batch["perm_mask"], out.perm_mask)
    # Exactly the last item of every example with a history is a target.
    assert batch["labels"].ne(-100).sum(1).tolist() == [1, 0, 1, 0, 1]


def test_seeds_reproduce_and_workers_draw_their_own(monkeypatch):
    features = examples([9] * 16)
    first = DataCollator("mlm", seed=3, **OPTIONS["mlm"])(features)
    again = DataCollator("mlm", seed=3, **OPTIONS["mlm"])(features)
    other = DataCollator("mlm", seed=4, **OPTIONS["mlm"])(features)
    assert torch.equal(first["labels"], again["labels"]) and not torch.equal(first["labels"], other["labels"])

    class Worker:
        id, seed = 0, 12345  # DataLoader gives each worker of each epoch its own seed

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: Worker)
    in_worker = DataCollator("mlm", seed=3, **OPTIONS["mlm"])(features)
    assert not torch.equal(first["labels"], in_worker["labels"])


def test_extra_keys_pass_through_and_max_length_keeps_the_last_items():
    features = [{"input_ids": [4, 5, 6, 7], "user": 3, "tags": ["a"]}, {"input_ids": [8, 9], "user": 5, "tags": []}]
    batch = DataCollator("clm", max_length=3)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["user"].tolist() == [3, 5] and batch["tags"] == [["a"], []]
    assert features[0]["input_ids"] == [4, 5, 6, 7]  # the caller's examples are untouched


@pytest.mark.parametrize("make, error, words", [
    (lambda: DataCollator("rtd", mask_token_id=1, vocab_size=V), ValueError, "rtd"),
    (lambda: DataCollator("mlm"), ValueError, "mask_token_id"),
    (lambda: DataCollator("mlm", mask_token_id=1, vocab_size=V, eval_on_last_item_only=False), ValueError,
     "eval_on_last_item_only"),
    (lambda: DataCollator("clm", mode="infer"), ValueError, "mode"),
    (lambda: DataCollator("clm", typo=1), TypeError, "typo"),
    (lambda: DataCollator(masking.get("clm", padding_idx=2), padding_idx=0), ValueError, "padding_idx"),
    (lambda: DataCollator(3), TypeError, "scheme_or_name"),
])
def test_bad_configurations_are_named(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_bad_features_are_named():
    collator = DataCollator("clm")
    with pytest.raises(ValueError, match="example 1.*padding_idx"):
        collator([{"input_ids": [3, 4]}, {"input_ids": [5, 0, 6]}])
    with pytest.raises(ValueError, match="example 0 has no 'input_ids'"):
        collator([{"ids": [3]}])
    with pytest.raises(ValueError, match="mix"):
        collator([{"input_ids": [3, 4], "labels": [-100, 4]}, {"input_ids": [5, 6]}])


# --- through transformers.Trainer ------------------------------------------------------------------


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_trainer_trains_on_train_masking_and_evaluates_on_eval_masking(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _tiny_bert()
    collator = DataCollator("mlm", padding_idx=0, seed=0, **OPTIONS["mlm"])
    train = examples([6, 8, 3, 9, 5, 7, 4, 8] * 4, seed=1)
    eval_examples = collator.eval_examples(examples([5, 7, 9, 4], seed=2))
    before = [p.detach().clone() for p in model.parameters()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                                          per_device_eval_batch_size=4, learning_rate=1e-2, report_to=[],
                                          save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, data_collator=collator, train_dataset=train,
                                   eval_dataset=eval_examples)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # Evaluation sees exactly the eval-mode batch: the last item of each example, [MASK]ed.
    metrics = trainer.evaluate()
    batch = DataCollator("mlm", mode="eval", **OPTIONS["mlm"])(examples([5, 7, 9, 4], seed=2))
    assert (batch["input_ids"][batch["labels"] != -100] == MASK).all()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["clm", "plm"])
def test_the_other_families_take_the_batch(name):
    transformers = pytest.importorskip("transformers")
    if name == "clm":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2,
                                                                     n_positions=16))
    else:
        model = transformers.XLNetLMHeadModel(transformers.XLNetConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2,
                                                                       d_inner=32))
    batch = DataCollator(name, seed=0)(examples([6, 3, 9]))
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_dataloader_workers_collate_plm_batches_with_their_own_draws():
    features = examples([9] * 8, seed=3) * 2  # two identical halves: one per worker
    loader = torch.utils.data.DataLoader(features, batch_size=8, num_workers=2,
                                         collate_fn=DataCollator("plm", seed=0))
    first, second = list(loader)
    assert first["perm_mask"].shape == (8, 9, 9) and torch.equal(first["input_ids"], second["input_ids"])
    assert not torch.equal(first["labels"], second["labels"])
    next_epoch = list(loader)  # fresh workers: new masks, not a replay of the last epoch's
    assert not torch.equal(first["labels"], next_epoch[0]["labels"])
    torch.manual_seed(7)
    run = [b["labels"] for b in loader]
    torch.manual_seed(7)  # the worker seeds come from the main process's RNG: reproducible
    assert all(torch.equal(a, b["labels"]) for a, b in zip(run, loader))
