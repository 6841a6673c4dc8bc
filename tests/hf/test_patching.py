"""seqloss.hf.patch: MLE reproduces each family's own loss; other objectives equal the functional
call under the family's convention; fused equals unfused; unpatch restores the model."""
from __future__ import annotations

import pytest
import torch

import seqloss
import seqloss.hf
from tests.hf.models import FAMILIES, blip, blip_batch, causal_batch, gpt2, llama, t5

SHIFTED = {"gpt2", "llama", "llava-style", "blip"}


def _model(name):
    torch.manual_seed(0)
    model = FAMILIES[name][0]()
    model.eval()
    return model, FAMILIES[name][1]()


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_mle_reproduces_the_models_own_loss_and_gradients(name):
    model, batch = _model(name)
    own = model(**batch).loss
    own.backward()
    own_grads = _grads(model)
    model.zero_grad()
    seqloss.hf.patch(model, "mle")
    ours = model(**batch).loss
    ours.backward()
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    for key, grad in _grads(model).items():
        torch.testing.assert_close(grad, own_grads[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("objective", ["smile", {"mle": 0.01, "smile": 0.99}, "reverse_subset"])
def test_objective_equals_the_functional_call_under_the_family_convention(name, objective):
    model, batch = _model(name)
    seqloss.hf.patch(model, objective)
    out = model(**batch)
    logits = out.logits
    smoothing = model.text_decoder.label_smoothing if name == "blip" else 0.0
    expected = seqloss.objective_loss(logits, batch["labels"], objective, shift=name in SHIFTED,
                                      label_smoothing=smoothing)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)


def test_blip_keeps_its_label_smoothing_unless_overridden():
    model, batch = blip(label_smoothing=0.1), blip_batch()
    logits = model(**batch).logits
    seqloss.hf.patch(model, "smile")
    kept = model(**batch).loss
    torch.testing.assert_close(kept, seqloss.smile_loss(logits, batch["labels"], shift=True, label_smoothing=0.1))
    seqloss.hf.patch(model, "smile", label_smoothing=0.0)
    overridden = model(**batch).loss
    torch.testing.assert_close(overridden, seqloss.smile_loss(logits, batch["labels"], shift=True))
    assert not torch.isclose(kept, overridden)


def test_blip_reduction_none_is_per_caption_sums():
    model, batch = blip(), blip_batch()
    image_embeds = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    call = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                encoder_hidden_states=image_embeds, labels=batch["labels"], reduction="none")
    own = model.text_decoder(**call).loss
    seqloss.hf.patch(model, "mle")
    ours = model.text_decoder(**call).loss
    assert ours.shape == own.shape == (3,)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [gpt2, llama])
@pytest.mark.parametrize("objective", ["mle", "smile", {"mle": 0.01, "smile": 0.99}])
def test_fused_equals_unfused_in_loss_and_gradients(make, objective):
    torch.manual_seed(0)
    model = make()
    batch = causal_batch(prefix=3)
    seqloss.hf.patch(model, objective)
    unfused = model(**batch)
    unfused.loss.backward()
    expected = _grads(model)
    model.zero_grad()
    seqloss.hf.patch(model, objective, fused=True)
    fused = model(**batch)
    fused.loss.backward()
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, unfused.loss, rtol=1e-5, atol=1e-6)
    grads = _grads(model)
    assert grads.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-4, atol=1e-6)


def test_fused_leaves_the_model_untouched_without_labels_and_after_the_call():
    torch.manual_seed(0)
    model = gpt2()
    batch = causal_batch()
    plain = model(input_ids=batch["input_ids"]).logits
    seqloss.hf.patch(model, "smile", fused=True)
    model(**batch)
    torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, plain)
    assert "forward" not in model.lm_head.__dict__ and "_loss_function" not in model.__dict__


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_unpatch_restores_the_models_own_loss(name):
    model, batch = _model(name)
    own = model(**batch).loss
    seqloss.hf.patch(model, "smile")
    assert seqloss.hf.patched_objective(model)["objective"] == "smile"
    assert not torch.isclose(model(**batch).loss, own)
    seqloss.hf.unpatch(model)
    assert seqloss.hf.patched_objective(model) is None
    torch.testing.assert_close(model(**batch).loss, own, rtol=0, atol=0)


def test_patch_twice_replaces_the_objective():
    model, batch = _model("gpt2")
    logits = model(input_ids=batch["input_ids"]).logits
    seqloss.hf.patch(model, "smile")
    seqloss.hf.patch(model, "reverse_subset")
    torch.testing.assert_close(model(**batch).loss, seqloss.reverse_subset_loss(logits, batch["labels"], shift=True))


def test_options_reach_the_objective():
    model, batch = _model("t5")
    logits = model(**batch).logits
    seqloss.hf.patch(model, "smile", exclude_ids=(0,), label_smoothing=0.1)
    torch.testing.assert_close(model(**batch).loss,
                               seqloss.smile_loss(logits, batch["labels"], exclude_ids=(0,), label_smoothing=0.1))


def test_seq2seq_tuple_outputs_carry_our_loss():
    model, batch = _model("t5")
    seqloss.hf.patch(model, "smile")
    as_dict = model(**batch)
    as_tuple = model(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)


def test_without_labels_the_model_runs_as_before():
    model, batch = _model("t5")
    batch.pop("labels")
    batch["decoder_input_ids"] = torch.zeros(3, 4, dtype=torch.long)
    before = model(**batch).logits
    seqloss.hf.patch(model, "smile")
    torch.testing.assert_close(model(**batch).logits, before)


def test_unsupported_models_are_refused_by_class_name():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel(transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match="BertModel"):
        seqloss.hf.patch(model, "smile")
    with pytest.raises(ValueError, match="T5ForConditionalGeneration"):
        seqloss.hf.patch(t5(), "smile", fused=True)


def test_fused_is_refused_when_the_head_output_is_transformed():
    # Soft-capping is followed instead (tests/hf/test_softcap.py); scalings are refused.
    model = llama()
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        seqloss.hf.patch(model, "mle", fused=True)


@pytest.mark.parametrize("bad, error, word", [
    (dict(objective="nope"), ValueError, "objective"),
    (dict(objective={"mle": -1.0}), ValueError, "weight"),
    (dict(objective="smile", shift=False), TypeError, "shift"),
    (dict(objective="smile", reduction="none"), ValueError, "reduction"),
    (dict(objective="smile", exclude_ids=(10_000,)), ValueError, "exclude_ids"),
    (dict(objective="smile", fused="yes"), TypeError, "fused"),
    (dict(objective="smile", bogus=1), TypeError, "bogus"),
    (dict(objective="smile", exact_accumulation=True), TypeError, "fused head"),
    (dict(objective="smile", fused=True, exact_accumulation="yes"), TypeError, "exact_accumulation"),
])
def test_bad_patch_arguments_fail_at_patch_time(bad, error, word):
    model = gpt2()
    with pytest.raises(error, match=word):
        seqloss.hf.patch(model, **bad)
    assert seqloss.hf.patched_objective(model) is None


@pytest.mark.parametrize("make", [gpt2, llama])
def test_fused_tuple_outputs_keep_their_layout(make):
    torch.manual_seed(0)
    model, batch = make(), causal_batch()
    seqloss.hf.patch(model, "smile")
    unfused = model(**batch, return_dict=False)
    seqloss.hf.patch(model, "smile", fused=True)
    fused = model(**batch, return_dict=False)
    assert len(fused) == len(unfused) >= 3                  # (loss, logits, past_key_values, ...)
    assert fused[1] is None and unfused[1].shape == (3, 9, 61)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-6)
    assert [type(item) for item in fused[2:]] == [type(item) for item in unfused[2:]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="labels on another device than the model need a GPU")
@pytest.mark.parametrize("name, fused", [("llama", False), ("llama", True), ("t5", False), ("blip", False)])
def test_labels_on_another_device_follow_the_logits(name, fused):
    model, batch = _model(name)
    seqloss.hf.patch(model, "smile", fused=fused)
    expected = model(**batch).loss
    model.cuda()
    inputs = {k: v.cuda() if k != "labels" else v for k, v in batch.items()}   # labels stay on the CPU
    loss = model(**inputs).loss
    assert loss.device.type == "cuda"
    torch.testing.assert_close(loss.cpu(), expected, rtol=1e-4, atol=1e-5)
    if name == "llama":
        outputs = seqloss.hf.unpatch(model)(input_ids=inputs["input_ids"])
        computed = seqloss.hf.compute_loss_func("smile")(outputs, batch["labels"])
        torch.testing.assert_close(computed.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, fused", [("llama", True), ("t5", False), ("bart", False)])
def test_arguments_given_by_position_are_not_missed(name, fused):
    import inspect

    model, batch = _model(name)
    seqloss.hf.patch(model, "smile", fused=fused)
    expected = model(**batch).loss
    names = list(inspect.signature(type(model).forward).parameters)[1:]   # without self
    position = names.index("labels")
    args = [batch.get(key) for key in names[:position + 1]]
    torch.testing.assert_close(model(*args).loss, expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="multiple values"):
        model(*args, labels=batch["labels"])


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "t5", "blip"])
def test_a_copy_of_a_patched_model_runs_its_own_weights(family, fused):
    """``copy.deepcopy`` (TRL's reference model, an EMA copy) of a patched model: the copy's forward
    is its own, with or without labels, and unpatching the copy leaves the original patched."""
    import copy
    if fused and family != "gpt2":
        pytest.skip("fused=True is for causal LMs")
    make, batch_of = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    batch = batch_of()
    seqloss.hf.patch(model, "smile", fused=fused)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    if family == "t5":
        unlabelled["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    assert not torch.allclose(model(**batch).loss, twin(**batch).loss)
    assert not torch.allclose(model(**unlabelled).logits, twin(**unlabelled).logits)
    expected = copy.deepcopy(twin)
    seqloss.hf.unpatch(expected)
    torch.testing.assert_close(twin(**unlabelled).logits, expected(**unlabelled).logits)
    seqloss.hf.unpatch(twin)
    assert seqloss.hf.patched_objective(model) is not None and seqloss.hf.patched_objective(twin) is None
