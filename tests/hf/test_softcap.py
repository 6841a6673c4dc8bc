"""Gemma 2 / Gemma 3 soft-cap their logits (``final_logit_softcapping``): ``patch(fused=True)`` now
follows them — the cap is applied inside the fused loss — and equals ``fused=False`` in loss and
gradients; the model's own MLE loss is reproduced either way."""
from __future__ import annotations

import pytest
import torch

import seqloss
import seqloss.hf
from tests.hf.models import V, causal_batch

transformers = pytest.importorskip("transformers")


def gemma(cap=2.0, version=2):
    torch.manual_seed(0)
    model_class, config_class = {2: (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
                                 3: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig)}[version]
    model = model_class(config_class(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32, final_logit_softcapping=cap,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.eval()
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("objective", ["mle", "smile", {"mle": 0.01, "smile": 0.99}])
def test_gemma_fused_equals_unfused(objective, version):
    model, batch = gemma(version=version), causal_batch()
    own = _loss_and_grads(model, batch)
    seqloss.hf.patch(model, objective)
    unfused = _loss_and_grads(model, batch)
    seqloss.hf.patch(model, objective, fused=True)
    fused = _loss_and_grads(model, batch)
    assert model.config.final_logit_softcapping == 2.0  # put back after the call
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-6)
    for key, grad in unfused[1].items():
        torch.testing.assert_close(fused[1][key], grad, rtol=1e-4, atol=1e-6)
    if objective == "mle":
        torch.testing.assert_close(fused[0], own[0], rtol=1e-5, atol=1e-6)
    seqloss.hf.unpatch(model)
    torch.testing.assert_close(model(**batch).loss, own[0])


def test_the_cap_matters_and_is_not_applied_twice():
    model, batch = gemma(cap=1.0), causal_batch()
    logits = model(input_ids=batch["input_ids"]).logits          # capped by the model
    seqloss.hf.patch(model, "smile", fused=True)
    expected = seqloss.smile_loss(logits, batch["labels"], shift=True)
    torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="soft-caps its logits itself"):
        seqloss.hf.patch(model, "smile", softcap=1.0)


def test_class_weights_and_z_loss_pass_through_patch():
    model, batch = gemma(), causal_batch()
    w = torch.rand(V, generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=batch["input_ids"]).logits
    seqloss.hf.patch(model, "smile", fused=True, weight=w, z_loss=1e-3)
    expected = seqloss.smile_loss(logits, batch["labels"], shift=True, weight=w, z_loss=1e-3)
    torch.testing.assert_close(model(**batch).loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="class weights must be a floating-point tensor of shape"):
        seqloss.hf.patch(model, "smile", weight=torch.ones(V + 2))
    with pytest.raises(TypeError, match="weight="):  # objective_loss's name, whatever the path
        seqloss.hf.patch(model, "smile", fused=True, class_weight=w)
    with pytest.raises(ValueError, match="return_stats"):
        seqloss.hf.patch(model, "smile", return_stats=True)
