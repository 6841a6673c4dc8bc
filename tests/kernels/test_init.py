"""When the Triton impl can run, and that asking for it where it cannot raises instead of falling back."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import seqloss
from seqloss import kernels
from tests.conftest import make_labels, make_logits


def test_reason_without_triton(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "not installed" in kernels.unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("interpret, runs", [("1", True), ("0", False)])
def test_reason_on_cpu_follows_the_interpreter(monkeypatch, interpret, runs):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    reason = kernels.unavailable_reason(torch.device("cpu"))
    assert (reason is None) == runs
    if not runs:
        assert "CUDA" in reason and "TRITON_INTERPRET" in reason


def test_cuda_needs_only_triton():
    pytest.importorskip("triton")
    assert kernels.unavailable_reason(torch.device("cuda")) is None


@pytest.mark.parametrize("call", ["logits", "fused"])
def test_triton_where_it_cannot_run_raises_a_value_error(monkeypatch, call):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, labels = make_logits(2, 3, 5), make_labels(2, 3, vocab_size=5)
    with pytest.raises(ValueError, match="impl='triton' cannot run"):
        if call == "logits":
            seqloss.cross_entropy(logits, labels, impl="triton")
        else:
            seqloss.linear_loss(logits, make_logits(4, 5), make_labels(2, 3, vocab_size=4), impl="triton")


@pytest.mark.parametrize("call", ["logits", "fused"])
def test_auto_never_picks_the_kernels_on_cpu(monkeypatch, call):
    def refuse():
        raise AssertionError("auto picked the Triton kernels")

    monkeypatch.setattr(kernels, "logits_engine", refuse)
    monkeypatch.setattr(kernels, "linear_engine", refuse)
    logits, labels = make_logits(2, 3, 5), make_labels(2, 3, vocab_size=5)
    if call == "logits":
        seqloss.smile_loss(logits, labels, impl="auto")
    else:
        seqloss.linear_loss(logits, make_logits(4, 5), make_labels(2, 3, vocab_size=4), objective="smile")
