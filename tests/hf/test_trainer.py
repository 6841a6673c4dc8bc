"""compute_loss_func with transformers.Trainer: gradient accumulation equals one big batch. A patched
model under a Trainer that would compute its own label-smoothed loss instead is refused."""
from __future__ import annotations

import pytest
import torch

import seqloss
import seqloss.hf
from tests.hf.models import causal_batch, gpt2

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")


def _rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 61, (n, 10), generator=g)
    labels = x.clone()
    lengths = torch.randint(3, 11, (n,), generator=g)            # uneven supervised counts per row
    labels[torch.arange(10) >= lengths[:, None]] = -100
    return datasets.Dataset.from_dict({"input_ids": x.tolist(), "labels": labels.tolist()})


def _args(output_dir, batch_size=8, accumulation=1, **extra):
    return transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant",
        max_grad_norm=0.0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_drop_last=True, **extra)


def _one_sgd_step(tmp_path, batch_size, accumulation, objective):
    torch.manual_seed(0)
    model = gpt2()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    args = _args(tmp_path / f"{batch_size}x{accumulation}", batch_size, accumulation)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows(),
                                   compute_loss_func=seqloss.hf.compute_loss_func(objective))
    trainer.train()
    return {k: before[k] - p.detach() for k, p in model.named_parameters()}  # = lr · gradient


@pytest.mark.parametrize("objective", ["mle", "smile"])
def test_two_accumulated_micro_batches_equal_one_big_batch(tmp_path, objective):
    big = _one_sgd_step(tmp_path, batch_size=8, accumulation=1, objective=objective)
    accumulated = _one_sgd_step(tmp_path, batch_size=4, accumulation=2, objective=objective)
    assert any(step.abs().max() > 0 for step in big.values())
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-4, atol=1e-6)


def test_compute_loss_func_is_the_functional_call():
    model = gpt2()
    batch = causal_batch()
    outputs = model(input_ids=batch["input_ids"])
    loss = seqloss.hf.compute_loss_func("smile", exclude_ids=(0,))(outputs, batch["labels"], num_items_in_batch=7)
    expected = seqloss.smile_loss(outputs.logits, batch["labels"], shift=True, exclude_ids=(0,),
                                  num_items_in_batch=7)
    torch.testing.assert_close(loss, expected)


def test_compute_loss_func_checks_its_objective_early():
    with pytest.raises(ValueError, match="objective"):
        seqloss.hf.compute_loss_func("nope")


@pytest.mark.parametrize("fused", [False, True])
def test_the_trainers_label_smoothing_would_bypass_a_patched_model_and_is_refused(tmp_path, fused):
    model = seqloss.hf.patch(gpt2(), "smile", fused=fused)
    smoothed = transformers.Trainer(model=model, args=_args(tmp_path / "smoothed", label_smoothing_factor=0.1),
                                    train_dataset=_rows())
    with pytest.raises(ValueError, match="label_smoothing_factor=0 and pass label_smoothing="):
        smoothed.train()
    # the objective's own smoothing, and the Trainer's when a compute_loss_func computes the loss, train
    seqloss.hf.patch(model, "smile", fused=fused, label_smoothing=0.1)
    transformers.Trainer(model=model, args=_args(tmp_path / "patched"), train_dataset=_rows()).train()
    transformers.Trainer(model=model, args=_args(tmp_path / "function", label_smoothing_factor=0.1),
                         train_dataset=_rows(), compute_loss_func=seqloss.hf.compute_loss_func("smile")).train()
