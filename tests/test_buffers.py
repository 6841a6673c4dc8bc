"""Gradient buffers: the CPU anonymous-map trick where the platform has it, ``torch.zeros`` where it
does not (Windows) — both give the same losses and gradients."""
from __future__ import annotations

import mmap

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss
from seqloss import _buffers
from tests.conftest import assert_close_fp32, make_labels, make_logits


@pytest.mark.parametrize("maps", [True, False], ids=["anonymous_map", "torch_zeros"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zeros_are_zero_writable_and_shaped(monkeypatch, maps, dtype):
    if maps and not _buffers.anonymous_maps():
        pytest.skip("no anonymous maps on this platform")
    monkeypatch.setattr(_buffers, "USE_ANONYMOUS_MAPS", maps)
    buffer = _buffers.zeros((3, 5), dtype, torch.device("cpu"))
    assert buffer.shape == (3, 5) and buffer.dtype == dtype and (buffer == 0).all()
    buffer.add_(1)
    assert (buffer == 1).all()
    assert _buffers.zeros((0, 5), dtype, torch.device("cpu")).shape == (0, 5)


def test_no_anonymous_maps_without_map_anonymous(monkeypatch):
    monkeypatch.delattr(mmap, "MAP_ANONYMOUS")
    assert not _buffers.anonymous_maps()


def test_the_fallback_never_maps_memory(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("mmap used although the fallback was forced")

    monkeypatch.setattr(_buffers, "USE_ANONYMOUS_MAPS", False)
    monkeypatch.setattr(mmap, "mmap", refuse)
    assert (_buffers.zeros((4, 4), torch.float32, torch.device("cpu")) == 0).all()


def _losses_and_grads():
    labels = make_labels(2, 6, vocab_size=29, seed=8)
    logits = make_logits(2, 6, 29, seed=8).requires_grad_(True)
    hidden = make_logits(2, 6, 7, seed=9, scale=1.0).requires_grad_(True)
    weight = make_logits(29, 7, seed=10, scale=0.5).requires_grad_(True)
    out = [seqloss.smile_loss(logits, labels, shift=True), seqloss.reverse_subset_loss(logits, labels),
           seqloss.linear_loss(hidden, weight, labels, objective={"mle": 0.5, "smile": 0.5})]
    sum(out).backward()
    return [o.detach() for o in out] + [logits.grad, hidden.grad, weight.grad]


def test_both_buffers_give_the_same_losses_and_gradients(monkeypatch):
    mapped = _losses_and_grads()
    monkeypatch.setattr(_buffers, "USE_ANONYMOUS_MAPS", False)
    for got, want in zip(_losses_and_grads(), mapped):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_logits_gradient_buffer_becomes_the_grad_without_a_copy(monkeypatch):
    # The one (B, N, V) tensor a backward must produce is the engine's buffer itself (no second copy).
    from seqloss import dispatch
    from seqloss.plan import Engine
    buffers = []
    engine = dispatch.LOGITS_TORCH.engine()

    def recorded(*args):
        out = engine.forward(*args)
        buffers.append(out.grads[0].data_ptr())
        return out

    monkeypatch.setattr(dispatch.LOGITS_TORCH, "_engine", Engine(recorded, None, rowwise=True))
    logits, labels = make_logits(3, 5, 41, seed=11).requires_grad_(True), make_labels(3, 5, vocab_size=41, seed=11)
    seqloss.smile_loss(logits, labels).backward()
    assert logits.grad.data_ptr() == buffers[-1]


# --- reused workspaces of the fused head (CPU) -------------------------------------------------------

OPTIONS = {"subset": lambda: {"include": torch.tensor([[1, 4, 9], [2, 2, -1]])},
           "random_subset": lambda: {"generator": torch.Generator().manual_seed(4), "num_samples": 3}}


def _head_grads(objective, seed, impl="torch"):
    """Loss and (hidden, weight) gradients of one fused-head call on fresh leaves."""
    labels = make_labels(2, 9, vocab_size=53, seed=seed)
    hidden = make_logits(2, 9, 6, seed=seed, scale=1.0).requires_grad_(True)
    weight = make_logits(53, 6, seed=seed + 1, scale=0.5).requires_grad_(True)
    name = {"mle": 0.3, "smile": 0.7} if objective == "mixture" else objective
    options = OPTIONS.get(objective, dict)()
    loss = seqloss.linear_loss(hidden, weight, labels, objective=name, shift=True, impl=impl, **options)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.fixture
def maps_only():
    if not _buffers.anonymous_maps():
        pytest.skip("no anonymous maps on this platform")
    _buffers.release_workspaces()
    yield
    _buffers.release_workspaces()


def test_a_dropped_weight_gradient_is_reused_by_the_next_call(maps_only):
    first = _head_grads("smile", 0)[2].data_ptr()  # the gradient dies here
    assert _head_grads("smile", 1)[2].data_ptr() == first


def test_a_gradient_the_caller_holds_is_never_overwritten(maps_only):
    held = _head_grads("mle", 0)[2]
    kept, address = held.clone(), held.data_ptr()
    view = held[2:].t()  # a view alone keeps the map too
    del held
    for objective in ("mle", "smile", "random_subset"):
        assert _head_grads(objective, 3)[2].data_ptr() != address
    torch.testing.assert_close(view.t(), kept[2:], rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["mle", "smile", "random_subset", "subset", "mixture"])
@pytest.mark.parametrize("before", ["mle", "smile", "random_subset"])
def test_reused_workspaces_give_the_reference_values_and_gradients(maps_only, objective, before):
    # The kept maps hold another call's stale gradient, overwritten with NaN: supports that write a
    # few rows of the weight gradient must zero what they reuse, full ones overwrite it without
    # letting the NaN through (addmm's beta=0).
    _head_grads(before, 5)
    reused = [w for w in _buffers._POOL.workspaces if w.free()]
    assert reused
    for w in reused:
        torch.frombuffer(w.region, dtype=torch.float32).fill_(float("nan"))
    fast, ref = _head_grads(objective, 6), _head_grads(objective, 6, impl="reference")
    assert_close_fp32(fast[0], ref[0])
    for got, want in zip(fast[1:], ref[1:]):
        assert_close_fp32(got, want, "backward")


def test_release_drops_the_kept_maps(maps_only):
    _head_grads("mle", 0)
    assert _buffers._POOL.workspaces
    _buffers.release_workspaces()
    assert not _buffers._POOL.workspaces


def test_a_tied_weight_gradient_is_added_into_the_workspace_in_place(maps_only):
    # GPT-2 ties the head to the embedding: autograd adds the embedding's gradient into the head's
    # in place only when the head's is a tensor of its own (not a view), else it allocates a third
    # V × H buffer. The sum must be right either way.
    labels = make_labels(2, 9, vocab_size=53, seed=2)
    hidden = make_logits(2, 9, 6, seed=2, scale=1.0).requires_grad_(True)
    weight = make_logits(53, 6, seed=3, scale=0.5).requires_grad_(True)
    ids = labels.clamp(min=0)
    seqloss.linear_loss(hidden, weight, labels, objective="smile", shift=True).backward()
    alone = weight.grad.clone()
    weight.grad = None
    embedded = torch.nn.functional.embedding(ids, weight).sum()  # first, as in the model: its backward runs last
    (embedded + seqloss.linear_loss(hidden, weight, labels, objective="smile", shift=True)).backward()
    maps = [torch.frombuffer(w.region, dtype=torch.uint8).data_ptr() for w in _buffers._POOL.workspaces]
    assert weight.grad.data_ptr() in maps and weight.grad._base is None
    embedding = torch.zeros_like(alone).index_add_(0, ids.flatten(), torch.ones(ids.numel(), 6))
    assert_close_fp32(weight.grad, alone + embedding, "backward")


# --- the per-process budget of kept workspaces ---------------------------------------------------------


@pytest.fixture
def budget(maps_only):
    previous = _buffers.set_workspace_budget(_buffers.set_workspace_budget(0))
    yield _buffers.set_workspace_budget
    _buffers.set_workspace_budget(previous)


def test_kept_workspaces_stay_within_the_budget(budget):
    budget(64 << 10)
    for objective in ("mle", "smile", "random_subset", "mle"):
        _head_grads(objective, 3)
        assert 0 < seqloss.kept_workspace_bytes() <= 64 << 10
    budget(1000)  # smaller than the weight gradient's map: dropped at once
    assert seqloss.kept_workspace_bytes() <= 1000


def test_a_budget_of_zero_keeps_nothing_and_changes_no_result(budget):
    want = _head_grads("mixture", 4)
    budget(0)
    got = _head_grads("mixture", 4)
    assert seqloss.kept_workspace_bytes() == 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_workspaces_are_shared_and_released_across_threads(budget):
    import threading
    budget(64 << 10)
    held = []
    worker = threading.Thread(target=lambda: held.append(_head_grads("mle", 0)[2].data_ptr()))
    worker.start()
    worker.join()
    assert seqloss.kept_workspace_bytes() > 0           # the worker's maps are the process's
    assert _head_grads("mle", 1)[2].data_ptr() == held[0]  # and the main thread reuses them
    seqloss.release_workspaces()
    assert seqloss.kept_workspace_bytes() == 0


def test_the_budget_comes_from_the_environment_and_is_checked(monkeypatch):
    monkeypatch.setenv("SEQLOSS_WORKSPACE_BYTES", "1234")
    assert _buffers._budget_from_environment() == 1234
    monkeypatch.setenv("SEQLOSS_WORKSPACE_BYTES", "lots")
    with pytest.raises(ValueError, match="SEQLOSS_WORKSPACE_BYTES"):
        _buffers._budget_from_environment()
    monkeypatch.delenv("SEQLOSS_WORKSPACE_BYTES")
    assert _buffers._budget_from_environment() == 512 << 20
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="nbytes"):
            seqloss.set_workspace_budget(bad)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_narrowing_in_place_equals_a_cast(shape, seed, dtype):
    fp32 = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 300
    out = _buffers.narrowed(fp32.clone(), dtype)
    assert out.dtype == dtype and out.shape == fp32.shape
    assert torch.equal(out, fp32.to(dtype))
