"""``torch.autocast`` (CPU bf16 and fp16; CUDA takes the same code): every objective and mixture, on
logits and through the fused head, runs with fp32 math inside and gives each gradient in its input's
dtype, within the low-precision criterion of tests/conftest.py:

    |autocast - fp32 truth| <= |naive (the dense spec on autocast's own logits) - fp32 truth| + slack.

Also mixed input dtypes outside autocast (a bf16 hidden with an fp32 head: computed in fp32)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqloss
from seqloss import kernels
from tests.conftest import (
    ACCUMULATED,
    OBJECTIVES_AND_MIXTURE,
    assert_low_precision,
    make_labels,
    make_logits,
    objective_of,
    options_of,
    random_grad_output,
)
from tests.test_torch_linear import VARIANTS, make_head, run_head, variant

B, N, H, V = 3, 7, 11, 37
TRITON = pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None,
                            reason="Triton cannot run here")
# The interpreted kernels are slow: bf16 only for them.
DTYPE_IMPL = pytest.mark.parametrize("dtype, impl", [
    pytest.param(torch.bfloat16, "torch", id="bf16-torch"), pytest.param(torch.float16, "torch", id="fp16-torch"),
    pytest.param(torch.bfloat16, "triton", id="bf16-triton", marks=TRITON)])


def _impls():
    return ["torch", pytest.param("triton", marks=TRITON)]


def _inputs(seed):
    hidden = make_logits(B, N, H, seed=seed, scale=1.0)
    weight, bias = make_head(V, H, seed)
    return hidden, weight, bias, make_labels(B, N, vocab_size=V, seed=seed)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@DTYPE_IMPL
@pytest.mark.parametrize("name", VARIANTS)
def test_fused_head_under_autocast(name, dtype, impl, reduction):
    hidden, weight, bias, labels = _inputs(seed=21)
    grad_output = 0.25 * random_grad_output((B, N), 21) if reduction == "none" else None

    def run(path, autocast):
        objective, options = variant(name, labels, V)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            return run_head(path, hidden, weight, labels, bias, grad_output=grad_output, objective=objective,
                            shift=True, label_smoothing=0.1, reduction=reduction, **options)

    truth = run("logits", autocast=False)   # the spec on fp32 logits
    naive = run("logits", autocast=True)    # the spec on autocast's F.linear logits
    fast = run(impl, autocast=True)
    assert fast[0].dtype == torch.float32
    assert [g.dtype for g in fast[1]] == [torch.float32] * 3, "each gradient in its input's dtype"
    assert_low_precision(fast[0], naive[0], truth[0], dtype, "forward", "loss")
    # The Triton engine accumulates in autocast's dtype (its default; exact_accumulation=True: fp32).
    relative = ACCUMULATED if impl == "triton" else 0.0
    for what, f, n, t in zip(("hidden", "weight", "bias"), fast[1], naive[1], truth[1]):
        assert_low_precision(f, n, t, dtype, "backward", f"grad of {what}", relative=relative)


@DTYPE_IMPL
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_logits_under_autocast(name, dtype, impl):
    # A model's head under autocast hands over low-precision logits; the loss takes them as they are.
    hidden, weight, _, labels = _inputs(seed=22)

    def run(loss_impl, autocast):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits = F.linear(h, w)
            out = seqloss.objective_loss(logits, labels, objective_of(name), shift=True, label_smoothing=0.1,
                                         impl=loss_impl, **options_of(name, labels, V))
        out.backward()
        return out.detach(), (h.grad, w.grad), logits.dtype

    truth, naive, fast = run("reference", False), run("reference", True), run(impl, True)
    assert fast[2] == dtype and fast[0].dtype == torch.float32
    assert [g.dtype for g in fast[1]] == [torch.float32] * 2
    assert_low_precision(fast[0], naive[0], truth[0], dtype, "forward", "loss")
    for what, f, n, t in zip(("hidden", "weight"), fast[1], naive[1], truth[1]):
        assert_low_precision(f, n, t, dtype, "backward", f"grad of {what}")


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("name", ["mle", "smile", "mixture"])
def test_low_precision_hidden_with_an_fp32_head(name, impl):
    # The usual mixed-precision set-up: activations in bf16, the head's master weight in fp32.
    hidden, weight, bias, labels = _inputs(seed=23)
    low = hidden.to(torch.bfloat16)
    objective, options = objective_of(name), options_of(name, labels, V)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = run_head(impl, low, weight, labels, bias, objective=objective, **options)
        naive = run_head("logits", low, weight, labels, bias, objective=objective, **options)
    truth = run_head("logits", low.float(), weight, labels, bias, objective=objective, **options)
    assert [g.dtype for g in fast[1]] == [torch.bfloat16, torch.float32, torch.float32]
    assert_low_precision(fast[0], naive[0], truth[0], torch.bfloat16, "forward", "loss")
    for what, f, n, t in zip(("hidden", "weight", "bias"), fast[1], naive[1], truth[1]):
        assert_low_precision(f, n, t, torch.bfloat16, "backward", f"grad of {what}")


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_mixed_dtypes_outside_autocast_compute_in_the_widest(impl):
    # No autocast: the head runs in fp32 (the widest input dtype); each gradient returns in its own dtype.
    hidden, weight, bias, labels = _inputs(seed=24)
    low = hidden.to(torch.bfloat16)
    fast = run_head(impl, low, weight, labels, bias, objective="smile")
    truth = run_head("logits", low.float(), weight, labels, bias, objective="smile")
    assert [g.dtype for g in fast[1]] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(fast[0], truth[0])
    torch.testing.assert_close(fast[1][0], truth[1][0].to(torch.bfloat16))
    for got, want in zip(fast[1][1:], truth[1][1:]):
        torch.testing.assert_close(got, want)
