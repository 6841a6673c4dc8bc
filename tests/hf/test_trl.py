"""TRL's SFTTrainer trains a seqloss objective through ``seqloss.hf.sft_trainer``: completion-only labels,
packing and padding-free batches; the loss it logs equals seqloss's objective computed by hand on the
same batch (each packed example scored on its own). ``patch`` warns that TRL bypasses it."""
from __future__ import annotations

import copy

import pytest
import torch

import seqloss
import seqloss.hf
from tests.hf.models import V, llama

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
tokenizers = pytest.importorskip("tokenizers")

MIXTURE = {"mle": 0.01, "smile": 0.99}


def _tokenizer():
    """A word-level tokenizer over the tiny model's V ids (TRL wants one; nothing is downloaded)."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, V)}}
    model = tokenizers.models.WordLevel(vocab, unk_token="<pad>")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                bos_token="<bos>")


def _dataset(n=6, seed=0):
    """Pre-tokenized prompt + completion rows: the completion mask marks what is trained."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "completion_mask": []}
    for _ in range(n):
        prompt, completion = int(torch.randint(2, 5, (), generator=g)), int(torch.randint(3, 7, (), generator=g))
        ids = torch.randint(3, V, (prompt + completion,), generator=g).tolist()
        rows["input_ids"].append(ids)
        rows["completion_mask"].append([0] * prompt + [1] * completion)
    return datasets.Dataset.from_dict(rows)


def _train_one_step(tmp_path, objective, fused=False, trainer_kwargs=None, **config):
    torch.manual_seed(0)
    model = llama()
    untouched = copy.deepcopy(model)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=6, learning_rate=1e-3,
                         logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                         completion_only_loss=True, seed=0, **config)
    trainer = seqloss.hf.sft_trainer(objective, fused=fused, model=model, args=args, train_dataset=_dataset(),
                                     processing_class=_tokenizer(), **(trainer_kwargs or {}))
    batches = []
    collate = trainer.data_collator

    def recording_collator(features):
        batch = collate(features)
        batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        return batch

    trainer.data_collator = recording_collator
    trainer.train()
    assert len(batches) == 1
    return trainer, untouched, batches[0]


@torch.no_grad()
def _by_hand(model, batch, objective):
    """seqloss's objective on the untrained model's logits for the batch the trainer saw."""
    position_ids = batch.get("position_ids")
    model_inputs = dict(input_ids=batch["input_ids"], position_ids=position_ids, use_cache=False)
    if "attention_mask" in batch:
        model_inputs["attention_mask"] = batch["attention_mask"]
    logits = model(**model_inputs).logits
    return seqloss.objective_loss(logits, batch["labels"], objective, shift=True, position_ids=position_ids)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packing", "padding_free"])
@pytest.mark.parametrize("objective", ["smile", MIXTURE])
def test_sft_trainer_logs_the_objective(tmp_path, objective, layout, fused):
    config = {"padded": {}, "packing": dict(packing=True, max_length=16), "padding_free": dict(padding_free=True, max_length=None)}
    trainer, untouched, batch = _train_one_step(tmp_path, objective, fused, **config[layout])
    if layout != "padded":
        assert batch["input_ids"].shape[0] == (1 if layout == "padding_free" else batch["input_ids"].shape[0])
        assert "position_ids" in batch and bool((batch["position_ids"][:, 1:] == 0).any())  # several examples a row
    logged = trainer.state.log_history[0]["loss"]
    expected = _by_hand(untouched, batch, objective)
    nll = _by_hand(untouched, batch, "mle")
    assert logged == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert abs(logged - float(nll)) > 0.1  # not TRL's own NLL
    assert bool((batch["labels"] == -100).any())  # prompts are masked (completion-only)
    changed = any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), untouched.parameters()))
    assert changed


def test_packed_examples_are_scored_separately_in_the_trainer(tmp_path):
    _, untouched, batch = _train_one_step(tmp_path, "smile", padding_free=True, max_length=None)
    with torch.no_grad():
        logits = untouched(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    separately = seqloss.smile_loss(logits, batch["labels"], shift=True, position_ids=batch["position_ids"])
    together = seqloss.smile_loss(logits, batch["labels"], shift=True)
    assert not torch.isclose(separately, together)


def test_patch_warns_that_trl_bypasses_the_loss_function():
    with pytest.warns(UserWarning, match="SFTTrainer .* never calls model.loss_function"):
        seqloss.hf.patch(llama(), "smile")


def test_sft_trainer_refuses_what_would_replace_the_objective(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func"):
        seqloss.hf.sft_trainer("smile", model=llama(), compute_loss_func=lambda *a, **k: 0)
    args = trl.SFTConfig(output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="label_smoothing"):
        seqloss.hf.sft_trainer("smile", model=llama(), args=args)
    with pytest.raises(ValueError, match="objective"):
        seqloss.hf.sft_trainer("nope", model=llama())



def test_sft_trainer_with_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer, untouched, batch = _train_one_step(tmp_path, "smile", trainer_kwargs=dict(peft_config=lora),
                                                padding_free=True, max_length=None)
    assert isinstance(trainer.model, peft.PeftModel)
    # LoRA's B starts at zero: the adapted model's first loss is the untouched model's.
    assert trainer.state.log_history[0]["loss"] == pytest.approx(float(_by_hand(untouched, batch, "smile")),
                                                                 rel=1e-5, abs=1e-6)
