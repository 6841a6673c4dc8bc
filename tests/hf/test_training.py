"""Where users meet seqloss in training: a patched model in transformers.Trainer under bf16 autocast
and torch.compile, and a patched model compiled by hand. Each asserts the loss is the objective asked
for (computed by hand on the same batch), not merely that training ran."""
from __future__ import annotations

import copy

import pytest
import torch

import seqloss
import seqloss.hf
from tests.conftest import TOLERANCES
from tests.hf.models import V, causal_batch, gpt2, llama

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

ROWS, N = 8, 10


def _rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, V, (ROWS, N), generator=g)
    labels = x.clone()
    lengths = torch.randint(4, N + 1, (ROWS,), generator=g)      # uneven supervised counts per row
    labels[torch.arange(N) >= lengths[:, None]] = -100
    return x, labels


def _train(tmp_path, make, objective, fused, steps=2, **arguments):
    """Train a patched tiny model on one full batch per step; returns (logged losses, the model as it
    was before training, the trained model)."""
    torch.manual_seed(0)
    model = make()
    initial = copy.deepcopy(model)
    if hasattr(initial, "get_base_model"):   # a PeftModel: the hand computation runs it unpatched
        initial = initial.get_base_model()
    seqloss.hf.patch(model, objective, fused=fused)
    x, labels = _rows()
    data = datasets.Dataset.from_dict({"input_ids": x.tolist(), "labels": labels.tolist()})
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=ROWS, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **arguments)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == steps
    return losses, initial, model


def _trainer_count(model, labels):
    """The ``num_items_in_batch`` the Trainer hands the model. It counts ``labels[..., 1:]`` only for
    models whose ``loss_type`` maps to ``ForCausalLMLoss``; GPT-2's ``loss_type`` is None, so there it
    counts every label, and the model's own loss (which ``patch`` reproduces) is ``sum / that count``."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    shifted = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    return int((labels[..., 1:] if shifted else labels).ne(-100).sum())


def _by_hand(model, objective, dtype=None):
    """The objective on the whole batch (a step's batch: its row order does not change the loss),
    normalised as the Trainer normalises it."""
    x, labels = _rows()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(input_ids=x).logits
    return seqloss.objective_loss(logits.float(), labels, objective, shift=True, impl="reference",
                                  num_items_in_batch=_trainer_count(model, labels))


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("objective", ["mle", "smile"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_trainer_bf16_logs_the_objective(tmp_path, make, objective, fused):
    losses, initial, trained = _train(tmp_path, make, objective, fused, bf16=True)
    truth = _by_hand(initial, objective)                          # fp32
    naive = _by_hand(initial, objective, dtype=torch.bfloat16)    # bf16 logits, as an unpatched model makes them
    allowed = (naive - truth).abs() + TOLERANCES[torch.bfloat16].forward
    assert abs(losses[0] - truth.item()) <= allowed.item(), (losses[0], truth.item(), naive.item())
    assert losses[1] < losses[0]                                  # it trained, on the objective's gradient
    assert seqloss.hf.patched_objective(trained)["objective"] == objective


def _lora_llama():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "lm_head"])
    return peft.get_peft_model(llama(), config)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
def test_trainer_bf16_with_lora_on_the_head_logs_the_objective(tmp_path, fused):
    losses, initial, trained = _train(tmp_path, _lora_llama, "smile", fused, bf16=True)
    truth = _by_hand(initial, "smile")
    naive = _by_hand(initial, "smile", dtype=torch.bfloat16)
    allowed = (naive - truth).abs() + TOLERANCES[torch.bfloat16].forward
    assert abs(losses[0] - truth.item()) <= allowed.item(), (losses[0], truth.item(), naive.item())
    assert losses[1] < losses[0]
    lora_B = trained.get_base_model().lm_head.lora_B["default"].weight
    assert not torch.equal(lora_B, initial.lm_head.lora_B["default"].weight)   # the head's adapter trained


@pytest.mark.parametrize("make", [llama, _lora_llama], ids=["llama", "lora_head"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("objective", ["mle", "smile", {"mle": 0.01, "smile": 0.99}])
def test_compiled_patched_model_equals_eager(make, fused, objective):
    # fullgraph: patch's bypass of the head and its loss_function swap trace without a graph break.
    # aot_eager: dynamo and AOTAutograd trace exactly what inductor would get (fake tensors, the custom
    # ops' fake implementations); inductor itself runs once, in the Trainer test below (it is slow on CPU)
    batch = causal_batch(prefix=2)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = seqloss.hf.patch(make(), objective, fused=fused)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        loss = run(**batch).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    (eager, eager_grads), (compiled, compiled_grads) = results
    assert compiled_grads.keys() == eager_grads.keys() and eager_grads
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for key, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[key], grad, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("fused, backend", [(False, "aot_eager"), (True, "inductor")], ids=["logits", "fused"])
def test_trainer_torch_compile_logs_the_objective(tmp_path, fused, backend):
    losses, initial, _ = _train(tmp_path, llama, "smile", fused, steps=1, torch_compile=True,
                                torch_compile_backend=backend)
    torch.testing.assert_close(torch.tensor(losses[0]), _by_hand(initial, "smile"), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
