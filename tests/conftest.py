"""Shared test machinery: the one tolerance table (STYLE §5) and builders of random batches.

Test modules import these helpers as ``from tests.conftest import ...`` (``tests`` is a package, so
this module never collides with another directory's ``conftest``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

import seqloss

# --- the one tolerance table -------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    forward: float   # loss values
    backward: float  # gradients of the logits


# fp32: the fast path must match the reference to these absolute/relative tolerances.
# bf16/fp16 (ml-cross-entropy criterion): |fast - fp32 truth| <= |naive same-dtype - fp32 truth| + slack,
# where "naive same-dtype" is impl="reference" run on the low-precision logits.
TOLERANCES: Dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(forward=1e-5, backward=5e-4),
    torch.bfloat16: Tolerance(forward=1e-2, backward=1e-2),
    torch.float16: Tolerance(forward=1e-2, backward=1e-2),
}


def assert_close_fp32(actual: Tensor, expected: Tensor, which: str = "forward") -> None:
    """``actual`` matches ``expected`` within the fp32 row of the table (absolute and relative)."""
    tol = getattr(TOLERANCES[torch.float32], which)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, equal_nan=False)


def assert_low_precision(fast: Tensor, naive: Tensor, truth: Tensor, dtype: torch.dtype,
                         which: str = "forward") -> None:
    """Element-wise ``|fast - truth| <= |naive - truth| + slack`` (truth in fp32)."""
    slack = getattr(TOLERANCES[dtype], which)
    fast, naive, truth = fast.float(), naive.float(), truth.float()
    assert fast.shape == truth.shape == naive.shape
    assert torch.isfinite(fast).all(), "fast path gave a non-finite value"
    excess = (fast - truth).abs() - ((naive - truth).abs() + slack)
    assert excess.numel() == 0 or excess.max() <= 0, f"{which}: exceeds the criterion by {excess.max():.3g}"


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
                ignore_index: int = IGNORE, ignored_rows: Tuple[int, ...] = (), low: int = 0) -> Tensor:
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


def member_options(name: str, labels: Tensor, vocab_size: int, seed: int = 0) -> Dict[str, Any]:
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
                  grad_output: Optional[Tensor] = None, **kwargs: Any) -> Tuple[Tensor, Tensor]:
    """The loss and d(<loss, grad_output>)/d(logits) of ``fn(leaf, labels, **kwargs)`` on a fresh leaf."""
    leaf = logits.detach().clone().requires_grad_(True)
    out = fn(leaf, labels, **kwargs)
    if grad_output is None:
        grad_output = torch.ones_like(out)
    out.backward(grad_output)
    return out.detach(), leaf.grad


def random_grad_output(shape: torch.Size, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=generator(seed + 40_000))
