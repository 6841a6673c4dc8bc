"""The fused engines' shared list part (grouped matrix products over gathered head rows): its
low-precision products (the GPU's way with bf16/fp16 inputs), run here on CPU tensors, against the
dense spec by the low-precision criterion; and the fp32 product helper."""
from __future__ import annotations

import pytest
import torch

import seqloss.grouped
from tests.conftest import ACCUMULATED, assert_low_precision, generator
from tests.test_torch_linear import _inputs, run_head, variant

LISTED = ("smile", "smile_no_first_token", "random_subset", "subset_per_row", "subset_per_position", "mixture")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", LISTED)
def test_low_precision_products_meet_the_criterion(monkeypatch, name, dtype):
    """Products in the inputs' dtype (forced on CPU; on a GPU they are the default for bf16/fp16)
    are as close to the fp32 truth as the dense head run in that dtype, loss and gradients."""
    monkeypatch.setattr(seqloss.grouped, "low_precision_products", lambda x: x.dtype == dtype)
    hidden, weight, bias, labels = _inputs(seed=21)
    low = [t.to(dtype) for t in (hidden, weight, bias)]

    def run(path, tensors):
        objective, options = variant(name, labels, weight.shape[0])
        return run_head(path, *tensors[:2], labels, tensors[2], objective=objective, reduction="sum",
                        label_smoothing=0.1, **options)

    truth, naive, fast = run("logits", [t.float() for t in low]), run("logits", low), run("torch", low)
    assert_low_precision(fast[0], naive[0], truth[0], dtype, "forward", "loss")
    # A mixture's gradient is the sum of its members' products, each rounded (the naive head rounds one).
    relative = ACCUMULATED if name == "mixture" else 0.0
    for what, f, n, t in zip(("hidden", "weight", "bias"), fast[1], naive[1], truth[1]):
        assert f.dtype == dtype
        assert_low_precision(f, n, t, dtype, "backward", f"grad of {what}", relative=relative)


def test_products_run_in_fp32_on_cpu_and_in_the_inputs_dtype_on_a_gpu():
    assert not seqloss.grouped.low_precision_products(torch.zeros(1, dtype=torch.bfloat16))
    meta = torch.zeros(1, dtype=torch.bfloat16, device="meta")
    assert not seqloss.grouped.low_precision_products(meta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bmm32_gives_fp32_products(dtype):
    a = torch.randn(2, 3, 8, generator=generator(1)).to(dtype)
    b = torch.randn(2, 8, 5, generator=generator(2)).to(dtype)
    out = seqloss.grouped.bmm32(a, b)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5)
    torch.testing.assert_close(out, torch.bmm(a.float(), b.float()), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("name", LISTED + ("reverse_subset",))
def test_the_gpu_layout_of_lists_gives_the_same_values(monkeypatch, name):
    """On a GPU the lists are padded to aligned lengths and a listed label takes its gradient through
    its column: forced here on CPU in fp32, loss and gradients stay those of the dense head."""
    monkeypatch.setattr(seqloss.grouped, "list_multiple", lambda device: 8)
    monkeypatch.setattr(seqloss.grouped, "fold_labels", lambda accumulator, device: True)
    hidden, weight, bias, labels = _inputs(seed=22)

    def run(path):
        objective, options = variant(name, labels, weight.shape[0])
        return run_head(path, hidden, weight, labels, bias, objective=objective, label_smoothing=0.1, **options)

    want, got = run("logits"), run("torch")
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_lists_pad_to_a_multiple_with_pad_ids():
    ids = torch.tensor([[3, 1, 4], [5, -1, -1]])
    padded = seqloss.grouped.pad_lists(ids, 4)
    assert padded.tolist() == [[3, 1, 4, -1], [5, -1, -1, -1]]
    assert seqloss.grouped.pad_lists(padded, 4) is padded
