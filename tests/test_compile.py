"""``torch.compile(fullgraph=True)``: every objective on logits and through the fused head compiles
and equals eager in values and gradients. The engines are opaque custom ops to Dynamo, so most
cases use the fast "aot_eager" backend (the graph and its autograd are what is tested); one case
runs Inductor by default, every objective with Inductor is marked ``slow``."""
from __future__ import annotations

import subprocess
import sys
from typing import Any, Callable

import pytest
import torch

import seqloss
from seqloss import kernels
from tests.conftest import assert_close_fp32, make_labels, make_logits, random_grad_output
from tests.test_torch_linear import VARIANTS, make_head, variant

B, N, H, V = 2, 6, 8, 13


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test compiles its own functions; no recompile limit carried over
    yield
    torch._dynamo.reset()


def _options(name: str, labels: torch.Tensor):
    objective, options = variant(name, labels, V)
    if "generator" in options:  # Dynamo cannot trace a torch.Generator: the global RNG, seeded per run
        options["generator"] = None
    return objective, options


def _run(fn: Callable, tensors: dict[str, torch.Tensor], labels: torch.Tensor, grad_output, **kwargs: Any):
    """fn's loss and the gradients of its float inputs, on fresh leaves, after seeding the global RNG."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    torch.manual_seed(0)
    out = fn(**leaves, labels=labels, **kwargs)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def _logits_loss(logits, labels, **kwargs):
    return seqloss.objective_loss(logits, labels, **kwargs)


def _fused_loss(hidden, weight, bias, labels, **kwargs):
    return seqloss.linear_loss(hidden, weight, labels, bias=bias, **kwargs)


def _check(path: str, name: str, reduction: str, backend: str, impl: str = "torch", **extra: Any) -> None:
    labels = make_labels(B, N, vocab_size=V, seed=3)
    if path == "logits":
        fn, tensors = _logits_loss, dict(logits=make_logits(B, N, V, seed=3))
    else:
        weight, bias = make_head(V, H, seed=3)
        fn, tensors = _fused_loss, dict(hidden=make_logits(B, N, H, seed=3, scale=1.0), weight=weight, bias=bias)
    objective, options = _options(name, labels)
    grad_output = random_grad_output((B, N), 3) if reduction == "none" else None
    kwargs = dict(objective=objective, shift=True, label_smoothing=0.1, reduction=reduction, impl=impl,
                  **options, **extra)
    eager = _run(fn, tensors, labels, grad_output, **kwargs)
    compiled = _run(torch.compile(fn, fullgraph=True, backend=backend), tensors, labels, grad_output, **kwargs)
    assert_close_fp32(compiled[0], eager[0])
    for key, grad in eager[1].items():
        assert compiled[1][key].dtype == grad.dtype
        assert_close_fp32(compiled[1][key], grad, "backward")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("name", VARIANTS)
def test_fullgraph_equals_eager(name, path, reduction):
    _check(path, name, reduction, "aot_eager")


@pytest.mark.parametrize("path", ["logits", "fused"])
def test_inductor_equals_eager(path):
    _check(path, "mixture", "mean", "inductor")


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["logits", "fused"])
@pytest.mark.parametrize("name", VARIANTS)
def test_inductor_every_objective(name, path, reduction):
    _check(path, name, reduction, "inductor")


@pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None, reason="Triton cannot run here")
@pytest.mark.parametrize("path", ["logits", "fused"])
def test_the_triton_impl_compiles(path):
    _check(path, "smile", "mean", "aot_eager", impl="triton")


@pytest.mark.parametrize("path", ["logits", "fused"])
def test_num_items_in_batch_as_a_tensor(path):
    # Hugging Face passes it as a tensor; its value check is eager-only, its use is traced.
    _check(path, "smile", "mean", "aot_eager", num_items_in_batch=torch.tensor(9))


def test_under_autocast_and_compile():
    hidden, (weight, bias) = make_logits(B, N, H, seed=4, scale=1.0), make_head(V, H, seed=4)
    labels = make_labels(B, N, vocab_size=V, seed=4)

    def step(hidden, weight, bias):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return seqloss.linear_loss(hidden, weight, labels, bias=bias, objective={"mle": 0.01, "smile": 0.99})

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        out = fn(*leaves)
        out.backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    assert_close_fp32(results[1][0], results[0][0])
    for got, want in zip(results[1][1], results[0][1]):
        assert got.dtype == torch.float32
        assert_close_fp32(got, want, "backward")


def test_a_module_compiles():
    logits, labels = make_logits(B, N, V, seed=5), make_labels(B, N, vocab_size=V, seed=5)
    module = seqloss.SmileLoss(shift=True, exclude_ids=(0,))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    assert_close_fp32(compiled(logits, labels), module(logits, labels))


def test_eager_calls_never_load_the_compiler():
    # The custom ops serve only traced calls: their first call would import the compiler (~2 s, ~150 MB).
    code = ("import sys, torch, seqloss\n"
            "x = torch.randn(2, 3, 5, requires_grad=True); y = torch.randint(0, 5, (2, 3))\n"
            "seqloss.smile_loss(x, y).backward()\n"
            "seqloss.linear_loss(x, torch.randn(7, 5, requires_grad=True), y, reduction='none').sum().backward()\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
