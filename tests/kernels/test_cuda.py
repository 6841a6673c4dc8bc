"""The Triton kernels compiled for a real GPU, against the dense spec on the same GPU.

The rest of ``tests/kernels`` checks the kernels through Triton's interpreter on CPU tensors; this
module runs only where CUDA is present (run it with ``TRITON_INTERPRET=0``, which also skips the
interpreted tests). It goes through the public functions alone, at shapes big enough for several
tiles, splits and programs per position, in fp32 and bf16 (ml-cross-entropy criterion).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import seqloss  # noqa: E402
from seqloss import kernels  # noqa: E402
from tests.conftest import MIXTURE, OBJECTIVE_NAMES, assert_close_fp32, assert_low_precision, generator  # noqa: E402

CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or kernels.unavailable_reason(CUDA) is not None,
                                reason="needs a CUDA GPU with Triton compiling (TRITON_INTERPRET unset or 0)")

NAMES = OBJECTIVE_NAMES + ("mixture",)


def _options(name: str, labels: torch.Tensor, V: int):
    """Objective and options of ``name``, built afresh per call (a generator is consumed by a call)."""
    if name == "mixture":
        return MIXTURE, {}
    options = {"smile": dict(exclude_ids=(1,)), "selective_eos": dict(eos_token_id=2),
               "random_subset": dict(num_samples=64, generator=generator(0)),
               "reverse_subset": dict(exclude_ids=(0,))}.get(name, {})
    if name == "subset":
        options = dict(include=torch.randint(-1, V, (*labels.shape[:-1], 200), generator=generator(3)).to(CUDA))
    return name, options


def _labels(B: int, N: int, V: int, seed: int) -> torch.Tensor:
    g = generator(seed)
    labels = (torch.rand(B, N, generator=g) ** 3 * V).long().clamp_(0, V - 1)  # skewed: rows share ids
    labels[torch.rand(B, N, generator=g) < 0.2] = -100
    return labels.to(CUDA)


def _run(fn, leaves, labels, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves, labels, **kwargs)
    out.backward()
    return out.detach().float(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_logits_kernels_on_gpu(name, dtype):
    B, N, V = 3, 700, 5003
    logits = (torch.randn(B, N, V, generator=generator(1)) * 3).to(CUDA)
    labels = _labels(B, N, V, 1)

    def loss(impl, x):
        objective, options = _options(name, labels, V)
        return _run(seqloss.objective_loss, [x], labels, objective=objective, impl=impl, shift=True,
                    label_smoothing=0.1, **options)

    truth, (truth_grad,) = loss("reference", logits)
    fast, (fast_grad,) = loss("triton", logits.to(dtype))
    assert fast_grad.dtype == dtype
    if dtype == torch.float32:
        assert_close_fp32(fast, truth)
        assert_close_fp32(fast_grad, truth_grad, "backward")
    else:
        naive, (naive_grad,) = loss("reference", logits.to(dtype))
        assert_low_precision(fast, naive, truth, dtype, what="loss")
        assert_low_precision(fast_grad, naive_grad, truth_grad, dtype, "backward", what="logits grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_head_kernels_on_gpu(name, dtype):
    B, N, H, V = 2, 1000, 256, 32003
    hidden = torch.randn(B, N, H, generator=generator(2)).to(CUDA)
    weight = (torch.randn(V, H, generator=generator(3)) * H ** -0.5).to(CUDA)
    labels = _labels(B, N, V, 2)

    def fused(impl, h, w):
        objective, options = _options(name, labels, V)
        return _run(seqloss.linear_loss, [h, w], labels, objective=objective, impl=impl, shift=True, **options)

    def on_logits(h, w):
        objective, options = _options(name, labels, V)
        return _run(lambda a, b, y, **kw: seqloss.objective_loss(F.linear(a, b), y, **kw), [h, w], labels,
                    objective=objective, impl="reference", shift=True, **options)

    truth, truth_grads = on_logits(hidden, weight)
    fast, fast_grads = fused("triton", hidden.to(dtype), weight.to(dtype))
    if dtype == torch.float32:
        torch.testing.assert_close(fast, truth, atol=1e-4, rtol=1e-4)  # TF32-free, but summation order differs
        for got, want in zip(fast_grads, truth_grads):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    else:
        naive, naive_grads = on_logits(hidden.to(dtype), weight.to(dtype))
        assert_low_precision(fast, naive, truth, dtype, what="loss")
        for got, naive_grad, want, what in zip(fast_grads, naive_grads, truth_grads, ("hidden", "weight")):
            assert got.dtype == dtype
            assert_low_precision(got, naive_grad, want, dtype, "backward", what=f"{what} grad")
