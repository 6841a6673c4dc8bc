"""Gradient buffers: the CPU anonymous-map trick where the platform has it, ``torch.zeros`` where it
does not (Windows) — both give the same losses and gradients."""
from __future__ import annotations

import mmap

import pytest
import torch

import seqloss
from seqloss import _buffers
from tests.conftest import make_labels, make_logits


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
    buffers = []
    engine = dispatch.logits_forward

    def recorded(*args):
        loss, grad = engine(*args)
        buffers.append(grad.data_ptr())
        return loss, grad

    monkeypatch.setattr(dispatch, "logits_forward", recorded)
    logits, labels = make_logits(3, 5, 41, seed=11).requires_grad_(True), make_labels(3, 5, vocab_size=41, seed=11)
    seqloss.smile_loss(logits, labels).backward()
    assert logits.grad.data_ptr() == buffers[-1]
