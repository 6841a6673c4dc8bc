"""On a CUDA GPU: the fused head and the logits path under ``torch.autocast("cuda", bfloat16)``
(ml-cross-entropy criterion against fp32, gradients in each input's dtype) and compiled with Inductor
(``fullgraph=True``, equal to eager), for the torch and Triton impls. Runs only where CUDA is present
(with ``TRITON_INTERPRET=0`` for the Triton impl)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqloss
from seqloss import kernels
from tests.conftest import MIXTURE, assert_close_fp32, assert_low_precision, generator

CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
B, N, H, V = 4, 256, 512, 8000


def _impls():
    runs = torch.cuda.is_available() and kernels.unavailable_reason(CUDA) is None
    return ["torch", pytest.param("triton", marks=pytest.mark.skipif(not runs, reason="Triton cannot run here"))]


def _inputs(seed=0):
    g = generator(seed)
    hidden = torch.randn(B, N, H, generator=g).to(CUDA)
    weight, bias = (torch.randn(V, H, generator=g) * H ** -0.5).to(CUDA), (torch.randn(V, generator=g) * 0.1).to(CUDA)
    labels = torch.randint(0, V, (B, N), generator=g).to(CUDA)
    labels[:, :16] = -100
    return hidden, weight, bias, labels


def _run(fn, tensors, autocast):
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("objective", ["mle", "smile", "mixture"])
def test_fused_head_under_cuda_autocast(objective, impl):
    hidden, weight, bias, labels = _inputs()
    objective = MIXTURE if objective == "mixture" else objective

    def fused(h, w, b):
        return seqloss.linear_loss(h, w, labels, bias=b, objective=objective, shift=True, impl=impl)

    def spec(h, w, b):
        return seqloss.objective_loss(F.linear(h, w, b), labels, objective, shift=True, impl="reference")

    fast, naive, truth = (_run(fused, (hidden, weight, bias), True), _run(spec, (hidden, weight, bias), True),
                          _run(spec, (hidden, weight, bias), False))
    assert [g.dtype for g in fast[1]] == [torch.float32] * 3
    assert_low_precision(fast[0], naive[0], truth[0], torch.bfloat16, "forward", "loss")
    for what, f, n, t in zip(("hidden", "weight", "bias"), fast[1], naive[1], truth[1]):
        assert_low_precision(f, n, t, torch.bfloat16, "backward", f"grad of {what}")


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("path", ["logits", "fused"])
def test_inductor_on_cuda_equals_eager(path, impl):
    hidden, weight, bias, labels = _inputs(1)
    if path == "logits":
        def fn(h, w, b):
            return seqloss.objective_loss(F.linear(h, w, b), labels, MIXTURE, shift=True, impl=impl)
    else:
        def fn(h, w, b):
            return seqloss.linear_loss(h, w, labels, bias=b, objective=MIXTURE, shift=True, impl=impl)
    torch._dynamo.reset()
    eager = _run(fn, (hidden, weight, bias), False)
    compiled = _run(torch.compile(fn, fullgraph=True), (hidden, weight, bias), False)
    assert_close_fp32(compiled[0], eager[0])
    for got, want in zip(compiled[1], eager[1]):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-3)  # Inductor's fused F.linear may round apart
