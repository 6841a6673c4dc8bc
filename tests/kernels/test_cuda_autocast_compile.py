"""On a CUDA GPU, with the option bundles of ``test_cuda.py``: every objective on the logits path
(logits from ``F.linear`` under autocast) and through the fused head under ``torch.autocast(bfloat16)``
(ml-cross-entropy criterion against fp32, gradients in each input's dtype), ``sampled_softmax_loss``
likewise, and both paths compiled with Inductor (``fullgraph=True``, equal to eager) with options on,
for the torch and Triton impls.

The same bodies run on CPU tensors at tiny shapes through Triton's interpreter (``TRITON_INTERPRET=1``:
CPU autocast, and the "aot_eager" backend instead of Inductor), so that they are known to be sound
where no GPU is; on the GPU (``TRITON_INTERPRET=0``) that twin skips.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import seqloss
from tests.conftest import generator
from tests.kernels.test_cuda import (
    BUNDLES,
    NAMES,
    SETTINGS,
    Run,
    Setting,
    bundle_id,
    common_options,
    compare,
    labels_for,
    member_options,
    run,
    runs_here,
)

IMPLS = ("torch", "triton")


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.skipif(
    not runs_here(name), reason="cuda: needs a CUDA GPU with Triton compiling (TRITON_INTERPRET=0); "
                                "interpreted: needs TRITON_INTERPRET=1")) for name in SETTINGS])
def setting(request) -> Setting:
    return SETTINGS[request.param]


def _head_inputs(setting: Setting, seed: int):
    B, N, H, V = setting.fused
    g = generator(seed)
    hidden = torch.randn(B, N, H, generator=g).to(setting.device)
    weight = (torch.randn(V, H, generator=g) * H ** -0.5).to(setting.device)
    bias = (torch.randn(V, generator=g) * 0.1).to(setting.device)
    return [hidden, weight, bias], labels_for(B, N, V, seed, setting.device), V


def _loss_fn(path: str):
    """The loss of (hidden, weight, bias, labels) on ``path``: logits made by F.linear, or the fused head."""
    if path == "logits":
        def on_logits(h, w, b, y, **kw):
            return seqloss.objective_loss(F.linear(h, w, b), y, **kw)
        return on_logits

    def fused(h, w, b, y, **kw):
        return seqloss.linear_loss(h, w, y, bias=b, **kw)
    return fused


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("path", ("logits", "fused"))
def test_every_objective_under_autocast(setting, path, name, impl):
    bundle_index = (NAMES.index(name) + 3 * (path == "fused")) % len(BUNDLES)
    bundle = BUNDLES[bundle_index]
    tensors, labels, V = _head_inputs(setting, 100 + bundle_index)
    fn = _loss_fn(path)

    def call(impl: str, autocast: bool) -> Run:
        objective, member = member_options(name, labels, V, setting, bundle_index)
        options = common_options(bundle, labels, V, path, bundle_index)
        with torch.autocast(setting.device.type, dtype=torch.bfloat16, enabled=autocast):
            return run(fn, tensors, labels, bundle_index, objective=objective, impl=impl, **options, **member)

    fast, naive, truth = call(impl, True), call("reference", True), call("reference", False)
    assert all(grad.dtype == torch.float32 for grad in fast.grads)
    accumulated = path == "fused" and impl == "triton" and not common_options(
        bundle, labels, V, path, bundle_index).get("exact_accumulation", False)
    compare(fast, naive, truth, torch.bfloat16, True, f"autocast {impl} {path} {name} {bundle_id(bundle)}",
            accumulated)


def test_sampled_softmax_under_autocast(setting):
    tensors, labels, V = _head_inputs(setting, 7)
    hidden, weight, _ = tensors
    options = common_options(dict(packed=True, token_weights=True, reduction="none"), labels, V, "sampled", 7)

    def call(impl: str, autocast: bool) -> Run:
        with torch.autocast(setting.device.type, dtype=torch.bfloat16, enabled=autocast):
            return run(seqloss.sampled_softmax_loss, [hidden, weight], labels, 7, num_negatives=setting.sampled[-1],
                       sampler="log_uniform", generator=generator(8), impl=impl, **options)

    fast, naive, truth = call("torch", True), call("reference", True), call("reference", False)
    assert all(grad.dtype == torch.float32 for grad in fast.grads)
    compare(fast, naive, truth, torch.bfloat16, True, "autocast sampled")


# (path, impl, objective, bundle): one compile each (Inductor's are slow), every option across them.
# random_subset stays eager: Dynamo cannot trace its torch.Generator.
COMPILED = [("logits", "torch", "mixture", 1), ("logits", "triton", "smile", 5),
            ("fused", "torch", "selective_eos", 6), ("fused", "triton", "subset", 2),
            ("fused", "triton", "mixture", 0), ("logits", "triton", "reverse_subset", 3)]


@pytest.mark.parametrize("path, impl, name, bundle_index", [
    pytest.param(*case, id=f"{case[0]}-{case[1]}-{case[2]}-{bundle_id(BUNDLES[case[3]])}") for case in COMPILED])
def test_compiled_equals_eager(setting, path, impl, name, bundle_index):
    tensors, labels, V = _head_inputs(setting, 200 + bundle_index)
    objective, member = member_options(name, labels, V, setting, bundle_index)
    options: dict[str, Any] = dict(common_options(BUNDLES[bundle_index], labels, V, path, bundle_index),
                                   objective=objective, impl=impl, **member)
    stats = options.get("return_stats", False)
    loss_fn = _loss_fn(path)

    def fn(h, w, b, y, **_):  # run() names the return_stats and reduction it reads
        return loss_fn(h, w, b, y, **options)

    backend = "inductor" if setting.device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    try:
        eager = run(fn, tensors, labels, bundle_index, return_stats=stats, reduction=options["reduction"])
        compiled = run(torch.compile(fn, fullgraph=True, backend=backend), tensors, labels, bundle_index,
                       return_stats=stats, reduction=options["reduction"])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(compiled.grads, eager.grads):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-3)  # Inductor's fused F.linear may round apart
    if stats:
        assert torch.equal(compiled.out.predicted_ids, eager.out.predicted_ids)
