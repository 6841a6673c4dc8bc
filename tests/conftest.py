"""Shared test machinery: the one tolerance table (STYLE §5) and builders of random batches.

Test modules import these helpers as ``from tests.conftest import ...`` (``tests`` is a package, so
this module never collides with another directory's ``conftest``).
"""
from __future__ import annotations

import os

# The Triton kernels are tested on CPU tensors by Triton's interpreter, which has to be chosen before
# Triton is first imported (transformers' Trainer imports it), hence here, before anything else.
os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from hypothesis import strategies as st
from torch import Tensor

import seqloss

# --- the one tolerance table -------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    forward: float   # loss values
    backward: float  # gradients (of the logits; of hidden, weight and bias for the fused head)


# fp32: the fast path must match the reference to these absolute/relative tolerances.
# bf16/fp16 (ml-cross-entropy criterion): |fast - fp32 truth| <= |naive same-dtype - fp32 truth| + slack,
# where "naive same-dtype" is impl="reference" run on the low-precision logits (for the fused head: on
# the low-precision logits F.linear(hidden, weight, bias)) and "truth" the same on an fp32 upcast.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(forward=1e-5, backward=5e-4),
    torch.bfloat16: Tolerance(forward=1e-2, backward=1e-2),
    torch.float16: Tolerance(forward=1e-2, backward=1e-2),
}


def assert_close_fp32(actual: Tensor, expected: Tensor, which: str = "forward") -> None:
    """``actual`` matches ``expected`` within the fp32 row of the table (absolute and relative)."""
    tol = getattr(TOLERANCES[torch.float32], which)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, equal_nan=False)


# Gradients accumulated in bf16/fp16 (the fused head's default on the Triton engine) are rounded at
# each of their additions, not once as the naive product's: they may also differ from the truth by
# this fraction of its magnitude (a few units in the last place of bf16).
ACCUMULATED = 2.0 ** -6


def assert_low_precision(fast: Tensor, naive: Tensor, truth: Tensor, dtype: torch.dtype,
                         which: str = "forward", what: str = "", relative: float = 0.0) -> None:
    """Element-wise ``|fast - truth| <= |naive - truth| + slack + relative·|truth|`` (truth in fp32);
    ``what`` names the compared quantity in the failure message."""
    slack = getattr(TOLERANCES[dtype], which)
    fast, naive, truth = fast.float(), naive.float(), truth.float()
    assert fast.shape == truth.shape == naive.shape
    assert torch.isfinite(fast).all(), "fast path gave a non-finite value"
    excess = (fast - truth).abs() - ((naive - truth).abs() + slack + relative * truth.abs())
    assert excess.numel() == 0 or excess.max() <= 0, f"{which} {what}: exceeds the criterion by {excess.max():.3g}"


# --- batches -----------------------------------------------------------------------------------

IGNORE = -100
OBJECTIVE_NAMES = tuple(sorted(seqloss.OBJECTIVES))
MIXTURE = {"mle": 0.01, "smile": 0.99}  # the SMILE authors' released checkpoint


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_logits(*shape: int, seed: int = 0, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Random logits (fp32 draws, then cast), not requiring grad."""
    return (torch.randn(*shape, generator=generator(seed)) * scale).to(dtype)


def make_labels(*shape: int, vocab_size: int, seed: int = 0, ignore_fraction: float = 0.25,
                ignore_index: int = IGNORE, ignored_rows: tuple[int, ...] = (), low: int = 0) -> Tensor:
    """Random labels in [low, V) with a fraction of ``ignore_index``; rows in ``ignored_rows`` (indices
    into the flattened leading dims) entirely ignored."""
    g = generator(seed + 10_000)
    labels = torch.randint(low, vocab_size, shape, generator=g)
    ignored = torch.rand(shape, generator=g) < ignore_fraction
    labels = torch.where(ignored, torch.full_like(labels, ignore_index), labels)
    if ignored_rows and labels.numel():
        flat = labels.reshape(-1, shape[-1])
        flat[list(ignored_rows)] = ignore_index
    return labels


def member_options(name: str, labels: Tensor, vocab_size: int, seed: int = 0) -> dict[str, Any]:
    """Non-default keyword options for one objective; build afresh for every call (the random
    generator is consumed by a call)."""
    V = vocab_size
    g = generator(seed + 20_000)
    lead = tuple(labels.shape[:-1])
    if name == "smile":
        return dict(exclude_ids=(1 % V,))
    if name == "random_subset":
        return dict(num_samples=4, generator=generator(seed + 30_000), exclude_ids=(0,))
    if name == "reverse_subset":
        return dict(exclude_ids=(0,))
    if name == "selective_eos":
        return dict(eos_token_id=2 % V)
    if name == "subset":  # per row, with negative padding and duplicates
        include = torch.randint(-2, V, (*lead, 5), generator=g)
        if include.numel():
            include[..., -1] = include[..., 0]
        return dict(include=include)
    return {}


def loss_and_grad(fn: Callable[..., Tensor], logits: Tensor, labels: Tensor,
                  grad_output: Optional[Tensor] = None, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """The loss and d(<loss, grad_output>)/d(logits) of ``fn(leaf, labels, **kwargs)`` on a fresh leaf."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, labels, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(out)
    out.backward(grad_output)
    return out.detach(), leaf.grad


def eager_and_compiled(grads: Callable[..., Any], fn: Callable[..., Tensor], *tensors: Any) -> tuple[Any, Any]:
    """``grads(fn, *tensors)`` eagerly and with ``fn`` under ``torch.compile(fullgraph=True)`` (aot_eager),
    Dynamo's caches reset around the pair."""
    torch._dynamo.reset()
    try:
        return grads(fn, *tensors), grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), *tensors)
    finally:
        torch._dynamo.reset()


def random_grad_output(shape: torch.Size, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=generator(seed + 40_000))


# --- objectives on logits: shared by the engine (test_torch_logits) and function-layer (test_functional) tests

OBJECTIVES_AND_MIXTURE = OBJECTIVE_NAMES + ("mixture",)
REDUCTIONS = ("mean", "sum", "none", "sequence")


def objective_of(name: str) -> Any:
    return MIXTURE if name == "mixture" else name


def options_of(name: str, labels: Tensor, vocab_size: int, seed: int = 0) -> dict[str, Any]:
    return {} if name == "mixture" else member_options(name, labels, vocab_size, seed)


def output_shape(reduction: str, lead: tuple[int, ...], N: int) -> tuple[int, ...]:
    return {"mean": (), "sum": (), "none": (*lead, N), "sequence": lead}[reduction]


def compare_impls(name: str, logits: Tensor, labels: Tensor, *, grad_output: Optional[Tensor] = None, seed: int = 0,
                  impl: str = "torch", **common: Any) -> tuple[Tensor, Tensor]:
    """Run ``impl`` and impl="reference" on the same fp32 inputs; assert values and gradients match."""
    V = logits.shape[-1]
    results = {}
    for path in (impl, "reference"):
        results[path] = loss_and_grad(seqloss.objective_loss, logits, labels, grad_output=grad_output,
                                      objective=objective_of(name), impl=path, **common,
                                      **options_of(name, labels, V, seed))
    (fast, fast_grad), (ref, ref_grad) = results[impl], results["reference"]
    assert fast.shape == ref.shape
    assert fast.dtype == torch.float32
    assert fast_grad.dtype == logits.dtype and fast_grad.shape == logits.shape
    assert_close_fp32(fast, ref, "forward")
    assert_close_fp32(fast_grad, ref_grad, "backward")
    return fast, fast_grad


@st.composite
def batches(draw, min_vocab: int = 1):
    """(logits (B, N, V), labels (B, N), seed) for hypothesis, B possibly 0, some rows all ignored."""
    B = draw(st.integers(0, 3))
    N = draw(st.integers(1, 6))
    V = draw(st.integers(min_vocab, 40))
    seed = draw(st.integers(0, 2**16))
    ignore = draw(st.sampled_from([0.0, 0.3, 1.0]))
    return make_logits(B, N, V, seed=seed), make_labels(B, N, vocab_size=V, seed=seed, ignore_fraction=ignore), seed
