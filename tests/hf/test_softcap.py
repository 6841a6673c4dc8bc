"""Gemma 2 / Gemma 3 soft-cap their logits (``final_logit_softcapping``; PaliGemma in its text config):
``patch(fused=True)`` follows them — the cap is applied inside the fused loss — and equals
``fused=False`` in loss and gradients; the model's own MLE loss is reproduced either way. A model that
changes its head's output in a way seqloss does not know is refused by the fused path."""
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


def paligemma(cap=0.5):
    """A vision-language model whose text model caps its logits: the cap is in ``config.text_config``."""
    torch.manual_seed(0)
    text = dict(model_type="gemma2", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=cap, pad_token_id=0)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16)
    config = transformers.PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=V - 1,
                                          projection_dim=16)
    return transformers.PaliGemmaForConditionalGeneration(config).eval()


def test_a_cap_in_the_text_config_is_followed():
    model = paligemma()
    assert getattr(model.config, "final_logit_softcapping", None) is None
    image_tokens = (16 // 8) ** 2
    input_ids = torch.cat([torch.full((2, image_tokens), V - 1), torch.randint(3, V - 1, (2, 7))], 1)
    labels = input_ids.clone()
    labels[:, :image_tokens + 1] = -100
    batch = dict(input_ids=input_ids, pixel_values=torch.randn(2, 3, 16, 16), labels=labels)
    own = _loss_and_grads(model, batch)
    seqloss.hf.patch(model, "mle", fused=True)
    fused = _loss_and_grads(model, batch)
    assert model.config.text_config.final_logit_softcapping == 0.5  # put back after the call
    torch.testing.assert_close(fused[0], own[0], rtol=1e-5, atol=1e-6)
    for key, grad in own[1].items():
        torch.testing.assert_close(fused[1][key], grad, rtol=1e-4, atol=1e-6, msg=key)


class ScaledLM(transformers.GPT2LMHeadModel):
    """A user's model that scales its logits in its own forward, where no config says so."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.transformer(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden) * 0.5
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels,
                                                              vocab_size=self.config.vocab_size)
        return transformers.modeling_outputs.CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)


def test_a_head_output_changed_before_the_loss_is_refused_not_trained():
    torch.manual_seed(0)
    model = ScaledLM(transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    batch = causal_batch()
    batch = dict(input_ids=batch["input_ids"], labels=batch["labels"])
    seqloss.hf.patch(model, "smile", fused=True)
    with pytest.raises(ValueError, match="changes the LM head's output before the loss.*fused=False"):
        model(**batch)
    seqloss.hf.patch(model, "smile")  # on the logits it sees what the model did
    logits = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(model(**batch).loss, seqloss.smile_loss(logits, batch["labels"], shift=True))


def test_a_changed_output_of_a_head_that_computes_the_loss_in_its_own_call_is_refused(tmp_path):
    # FSDP2 with the head a unit of its own: the loss is made inside the head's call, then compared once.
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                     tie_word_embeddings=False)
    batch = causal_batch()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for model_class, fails in ((ScaledLM, True), (transformers.GPT2LMHeadModel, False)):
            model = seqloss.hf.patch(model_class(config).eval(), "smile", fused=True)
            fully_shard(model.lm_head)
            fully_shard(model)
            if fails:
                with pytest.raises(ValueError, match="changes the LM head's output before the loss"):
                    model(input_ids=batch["input_ids"], labels=batch["labels"])
            else:
                assert torch.isfinite(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    finally:
        dist.destroy_process_group()
