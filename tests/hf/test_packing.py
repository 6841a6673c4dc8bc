"""seqloss.hf.patch on packed batches: the model call's ``position_ids`` (or the ``cu_seq_lens_q`` a
flattening collator passes instead) reach the loss, so a padding-free batch from
``transformers.DataCollatorWithFlattening`` trains each example with its own SMILE set and first
token — the loss of the same examples padded as rows."""
from __future__ import annotations

import pytest
import torch

import seqloss
import seqloss.hf
from tests.hf.models import gpt2, llama

transformers = pytest.importorskip("transformers")

OBJECTIVES = ["mle", "smile", {"mle": 0.01, "smile": 0.99}, "reverse_subset"]


def _examples(lengths=(5, 3, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 61, (n,), generator=g).tolist()} for n in lengths]


def _padded(examples):
    """The same examples as right-padded rows (labels -100 at padding)."""
    N = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.zeros(len(examples), N, dtype=torch.long)
    mask = torch.zeros(len(examples), N, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    return dict(input_ids=input_ids, attention_mask=mask, labels=input_ids.masked_fill(mask == 0, -100))


def _model(make):
    torch.manual_seed(0)
    model = make()
    model.eval()
    return model


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("make", [llama, gpt2])
def test_a_flattened_batch_trains_like_the_padded_one(make, objective, fused):
    model = _model(make)
    examples = _examples()
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")(examples)
    assert "position_ids" in packed and packed["input_ids"].shape[0] == 1
    packed["use_cache"] = False  # as trainers call it: transformers then masks attention per example
    seqloss.hf.patch(model, objective, fused=fused)
    packed_loss = model(**packed).loss
    packed_loss.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    padded_loss = model(**_padded(examples)).loss
    padded_loss.backward()
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for key, grad in packed_grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[key].grad, rtol=1e-4, atol=1e-6)


def test_the_patched_loss_is_the_functional_call_with_the_calls_position_ids():
    model = _model(llama)
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")(_examples())
    packed["use_cache"] = False
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    seqloss.hf.patch(model, "smile")
    expected = seqloss.smile_loss(logits, packed["labels"], shift=True, position_ids=packed["position_ids"])
    ignoring_packing = seqloss.smile_loss(logits, packed["labels"], shift=True)
    torch.testing.assert_close(model(**packed).loss, expected)
    assert not torch.isclose(expected, ignoring_packing)


@pytest.mark.parametrize("fused", [False, True])
def test_flash_attention_boundaries_stand_in_for_position_ids(fused):
    """With ``return_flash_attn_kwargs=True`` and no ``position_ids``, the loss reads the example
    boundaries from ``cu_seq_lens_q`` (transformers hands them to ``loss_function``)."""
    model = _model(llama)
    collate = transformers.DataCollatorWithFlattening(return_tensors="pt", return_position_ids=False,
                                                      return_flash_attn_kwargs=True)
    batch = collate(_examples())
    assert "position_ids" not in batch and "cu_seq_lens_q" in batch
    logits = model(input_ids=batch["input_ids"]).logits
    position_ids = torch.cat([torch.arange(n) for n in (5, 3, 7)]).unsqueeze(0)
    expected = seqloss.smile_loss(logits, batch["labels"], shift=True, position_ids=position_ids)
    seqloss.hf.patch(model, "smile", fused=fused)
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"], cu_seq_lens_q=batch["cu_seq_lens_q"]).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_position_ids_are_set_by_the_call_not_by_patch():
    with pytest.raises(TypeError, match="position_ids"):
        seqloss.hf.patch(_model(llama), "smile", position_ids=torch.zeros(1, 3, dtype=torch.long))


def test_turns_pass_through_patch():
    model = _model(llama)
    batch = _padded(_examples())
    batch["labels"][:, 2] = -100                              # two supervised runs in every row
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    seqloss.hf.patch(model, "smile", turns=True)
    torch.testing.assert_close(model(**batch).loss,
                               seqloss.smile_loss(logits, batch["labels"], shift=True, turns=True))


@pytest.mark.parametrize("fused", [False, True])
def test_a_compiled_patched_model_takes_packed_batches(fused):
    """fullgraph: the call's position_ids reach the loss through the traced forward."""
    examples = _examples()
    packed = dict(transformers.DataCollatorWithFlattening(return_tensors="pt")(examples), use_cache=False)
    results = []
    for compiled in (False, True):
        model = seqloss.hf.patch(_model(llama), "smile", fused=fused)
        run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        loss = run(**packed).loss
        loss.backward()
        results.append((loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}))
    torch._dynamo.reset()
    (eager, eager_grads), (compiled_loss, compiled_grads) = results
    padded = seqloss.hf.patch(_model(llama), "smile", fused=fused)(**_padded(examples)).loss
    torch.testing.assert_close(eager, padded.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_loss, eager, rtol=1e-5, atol=1e-6)
    for key, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[key], grad, rtol=1e-4, atol=1e-6)


def test_multimodal_position_ids_are_not_read_as_packing_and_the_user_is_told():
    """Qwen2-VL's rotary positions (3, B, N) repeat inside an image: they cannot mark examples, so
    each row is one sequence (with a warning); flash-attention boundaries still mark them."""
    from seqloss.hf.patching import packed_positions
    labels = torch.zeros(2, 6, dtype=torch.long)
    rotary = torch.tensor([0, 1, 1, 1, 2, 3]).expand(3, 2, 6)
    with pytest.warns(UserWarning, match="multimodal position_ids"):
        assert packed_positions(rotary, None, labels) is None
    with pytest.warns(UserWarning, match="multimodal position_ids"):
        both = packed_positions(rotary, torch.tensor([0, 4, 12]), labels)
    assert both.tolist() == [[0, 1, 2, 3, 0, 1], [2, 3, 4, 5, 6, 7]]
