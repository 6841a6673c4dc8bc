"""seqloss.hf.patch on PEFT models: patching before or after get_peft_model, LoRA with and without the
LM head, fused and not, gives the model's own MLE loss and LoRA gradients; what the fused head cannot
reproduce exactly is refused, never computed wrong."""
from __future__ import annotations

import pytest
import torch

import seqloss
import seqloss.hf
from tests.hf.models import causal_batch, gpt2, llama

peft = pytest.importorskip("peft")

TARGETS = {  # attention projections of each family, with or without the LM head
    gpt2: (["c_attn"], ["c_attn", "lm_head"]),
    llama: (["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]),
}


def _peft_model(make, with_head, patch_first=None, seed=0, **config):
    """A tiny model with LoRA (random B, so the adapter changes the head); ``patch_first`` = patch
    arguments applied to the base model before ``get_peft_model``."""
    torch.manual_seed(seed)
    model = make()
    if patch_first is not None:
        seqloss.hf.patch(model, **patch_first)
    config = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    config.setdefault("target_modules", TARGETS[make][with_head])
    return peft.get_peft_model(model, peft.LoraConfig(**config))


def _loss_and_lora_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if "lora_" in k}


def _assert_same(actual, expected):
    loss, grads = actual
    expected_loss, expected_grads = expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for key, grad in grads.items():
        assert grad.abs().max() > 0, f"{key}: zero LoRA gradient"
        torch.testing.assert_close(grad, expected_grads[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("with_head", [False, True], ids=["lora_body", "lora_body_and_head"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused"])
@pytest.mark.parametrize("when", ["after", "before"])
def test_mle_is_the_peft_models_own_loss_and_lora_gradients(make, with_head, fused, when):
    batch = causal_batch(prefix=2)
    own = _loss_and_lora_grads(_peft_model(make, with_head), batch)
    if when == "after":
        model = _peft_model(make, with_head)
        assert seqloss.hf.patch(model, "mle", fused=fused) is model   # the PeftModel, as passed in
    else:
        model = _peft_model(make, with_head, patch_first=dict(objective="mle", fused=fused))
    assert seqloss.hf.patched_objective(model)["fused"] is fused
    if with_head:
        assert type(model.get_base_model().lm_head).__name__ == "Linear"  # peft's lora.Linear
        assert "lora" in type(model.get_base_model().lm_head).__module__
    _assert_same(_loss_and_lora_grads(model, batch), own)


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("objective", ["smile", {"mle": 0.01, "smile": 0.99}])
@pytest.mark.parametrize("when", ["after", "before"])
def test_fused_equals_unfused_with_lora_on_the_head(make, objective, when):
    batch = causal_batch(prefix=2)

    def patched(fused):
        if when == "before":
            return _peft_model(make, True, patch_first=dict(objective=objective, fused=fused))
        return seqloss.hf.patch(_peft_model(make, True), objective, fused=fused)

    unfused_model = patched(False)
    logits = unfused_model(input_ids=batch["input_ids"]).logits   # the adapted head's logits
    unfused = _loss_and_lora_grads(unfused_model, batch)
    torch.testing.assert_close(unfused[0], seqloss.objective_loss(logits, batch["labels"], objective, shift=True))
    _assert_same(_loss_and_lora_grads(patched(True), batch), unfused)


def test_lora_dropout_and_bias_on_the_head_are_reproduced_in_training_mode():
    batch = causal_batch(prefix=2)
    results = []
    for fused in (False, True):
        model = _peft_model(llama, True, lora_dropout=0.3, lora_bias=True)
        with torch.no_grad():
            model.get_base_model().lm_head.lora_B["default"].bias.normal_()
        model.train()
        seqloss.hf.patch(model, "smile", fused=fused)
        torch.manual_seed(1)  # the same dropout masks in both runs
        results.append(_loss_and_lora_grads(model, batch))
    _assert_same(results[1], results[0])


def test_two_active_adapters_on_the_head():
    batch = causal_batch()
    results = []
    for fused in (False, True):
        model = _peft_model(llama, True)
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                    target_modules=["lm_head"]))
        model.base_model.set_adapter(["default", "second"])
        seqloss.hf.patch(model, "mle", fused=fused)
        results.append(_loss_and_lora_grads(model, batch))
    _assert_same(results[1], results[0])


def test_merged_and_disabled_adapters():
    batch = causal_batch()
    model = _peft_model(llama, True)  # untied head: merging LoRA into GPT-2's tied head changes its embedding too
    with torch.no_grad():
        adapted = model(**batch).loss
        with model.disable_adapter():
            base = model(**batch).loss
    seqloss.hf.patch(model, "mle", fused=True)
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).loss, base, rtol=1e-5, atol=1e-6)
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).loss, adapted, rtol=1e-5, atol=1e-6)


def test_modules_to_save_head_uses_the_trained_copy():
    batch = causal_batch()
    torch.manual_seed(0)
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                                  init_lora_weights=False))
    with torch.no_grad():
        model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(1.5)  # the copy differs
    own = _loss_and_lora_grads(model, batch)
    head_grad = model.get_base_model().lm_head.modules_to_save["default"].weight.grad.clone()
    seqloss.hf.patch(model, "mle", fused=True)
    _assert_same(_loss_and_lora_grads(model, batch), own)
    torch.testing.assert_close(model.get_base_model().lm_head.modules_to_save["default"].weight.grad, head_grad,
                               rtol=1e-4, atol=1e-6)


def test_dora_on_the_head_is_refused_with_the_fix():
    batch = causal_batch()
    model = _peft_model(llama, True, use_dora=True)
    with pytest.raises(ValueError, match="(?s)DoRA.*fused=False.*merge_and_unload"):
        seqloss.hf.patch(model, "mle", fused=True)
    assert seqloss.hf.patched_objective(model) is None
    # patched before the adapter came: refused at the forward, not computed wrong
    own = _peft_model(llama, True, use_dora=True)(**batch).loss
    model = _peft_model(llama, True, patch_first=dict(objective="mle", fused=True), use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        model(**batch)
    seqloss.hf.patch(model, "mle")  # the logits path handles any head
    torch.testing.assert_close(model(**batch).loss, own, rtol=1e-5, atol=1e-6)


def test_unknown_head_wrappers_and_hooks_are_refused():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = llama()
    model.lm_head = Scaled(16, 61, bias=False)
    with pytest.raises(ValueError, match="Scaled"):
        seqloss.hf.patch(model, "mle", fused=True)
    model = llama()
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(ValueError, match="hooks"):
        seqloss.hf.patch(model, "mle", fused=True)
    handle.remove()
    seqloss.hf.patch(model, "mle", fused=True)
    model.lm_head.register_forward_pre_hook(lambda module, args: args)   # added after patch
    with pytest.raises(ValueError, match="hooks"):
        model(**causal_batch())


def test_a_gathered_head_with_other_hooks_is_refused():
    # A head ZeRO-3 partitions (its parameters marked with ds_id) is read inside its own call, where only
    # the gathering hooks may run; a hook of anything else is refused (ZeRO-3 itself: test_distributed.py).
    model = llama()
    seqloss.hf.patch(model, "smile", fused=True)
    model.lm_head.weight.ds_id = 7
    model.lm_head.register_forward_pre_hook(lambda module, args: args)
    with pytest.raises(ValueError, match="besides the hooks that gather its weight"):
        model(**causal_batch())


def test_unpatch_through_the_peft_model():
    batch = causal_batch()
    model = _peft_model(llama, True)
    own = model(**batch).loss
    seqloss.hf.patch(model, "smile", fused=True)
    assert not torch.isclose(model(**batch).loss, own)
    assert seqloss.hf.unpatch(model) is model
    assert seqloss.hf.patched_objective(model) is None
    torch.testing.assert_close(model(**batch).loss, own, rtol=0, atol=0)
    assert "forward" not in model.get_base_model().lm_head.__dict__


@pytest.mark.parametrize("name, targets", [("t5", ["q", "v", "lm_head"]), ("bart", ["q_proj", "v_proj"]),
                                           ("blip", ["query", "value"])])
def test_seq2seq_and_blip_peft_models_keep_their_own_loss(name, targets):
    from tests.hf.models import FAMILIES

    make, make_batch = FAMILIES[name]
    batch = make_batch()

    def lora_model():
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
        return peft.get_peft_model(make(), config)

    own = _loss_and_lora_grads(lora_model(), batch)
    model = lora_model()
    assert seqloss.hf.patch(model, "mle") is model
    _assert_same(_loss_and_lora_grads(model, batch), own)
    with pytest.raises(ValueError, match="causal"):
        seqloss.hf.patch(model, "mle", fused=True)
