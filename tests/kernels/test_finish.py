"""The full parts' finishing kernel (Triton's interpreter, CPU tensors) against the torch math it
replaces: split statistics merged into lse, Σ z and size; α × each scored position's loss term
(label smoothing, z-loss) added into the sums, nothing at empty slots or positions the part does not
score; and the gradient pass's per-slot values — over random splits and slots (hypothesis)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import Tensor

pytest.importorskip("triton")

from seqloss import kernels  # noqa: E402
from seqloss.call import SoftmaxOptions  # noqa: E402
from seqloss.kernels.finish import finish  # noqa: E402
from seqloss.kernels.parts import Part  # noqa: E402
from tests.conftest import generator  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None,
                                reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1")


def _splits(z: list[Tensor], S: int, g: torch.Generator) -> Tensor:
    """Each slot's logits (a list of 1-D tensors) cut into S splits, one of them possibly empty →
    (4, S, P): max, Σ exp(z - max), Σ z, count (an empty split: -1e30, 0, 0, 0, as the kernel leaves it)."""
    out = torch.zeros(4, S, len(z))
    out[0] = -1e30
    for p, row in enumerate(z):
        cuts = torch.sort(torch.randint(0, row.numel() + 1, (S - 1,), generator=g)).values.tolist()
        for s, piece in enumerate(torch.tensor_split(row, cuts)):
            if piece.numel():
                top = piece.max()
                count = torch.tensor(float(piece.numel()))
                out[:, s, p] = torch.stack([top, (piece - top).exp().sum(), piece.sum(), count])
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), N=st.integers(1, 30), S=st.integers(1, 3),
       alpha=st.sampled_from([1.0, 0.25]), eps=st.sampled_from([0.0, 0.1]), zeta=st.sampled_from([0.0, 1e-3]),
       weights=st.booleans(), z_part=st.booleans())
def test_the_kernel_equals_the_torch_math(seed, B, N, S, alpha, eps, zeta, weights, z_part):
    g = generator(seed)
    positions = torch.rand(B, N, generator=g) < 0.7
    slots = torch.randperm(B * N, generator=g)[: max(1, B * N // 2)]
    slots[torch.rand(slots.shape, generator=g) < 0.2] = -1                  # empty slots
    logits = [torch.randn(int(torch.randint(1, 12, (), generator=g)), generator=g) * 3 for _ in slots]
    split = _splits(logits, S, g)
    z_y = torch.stack([row[0] for row in logits])                            # the label is one of each slot's ids
    part = Part(slots.unsqueeze(0), positions)
    w = torch.rand(B, N, generator=g) if weights else None
    loss = torch.rand(B * N, generator=g)
    zsums = torch.rand(B * N, generator=g) if z_part else None
    want_loss, want_z = loss.clone(), None if zsums is None else zsums.clone()
    values = finish(split, z_y, part, alpha, SoftmaxOptions(eps, zeta, 0.0), loss, zsums, w)

    lse = torch.stack([row.logsumexp(0) for row in logits])
    mean = torch.stack([row.mean() for row in logits])
    on = (slots >= 0) & positions.reshape(-1)[slots.clamp(min=0)]
    z_term = zeta * lse * lse
    want_loss.index_add_(0, slots[on], alpha * (lse - (1 - eps) * z_y - eps * mean + z_term)[on])
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    if want_z is not None:
        want_z.index_add_(0, slots[on], alpha * z_term[on] if zeta else torch.zeros(int(on.sum())))
        torch.testing.assert_close(zsums, want_z, atol=1e-6, rtol=1e-5)
    assert (values is None) == (not weights)
    if values is not None:
        torch.testing.assert_close(values.lse, lse, atol=1e-5, rtol=1e-5)
        assert values.size.tolist() == [float(row.numel()) for row in logits]
        assert w is not None
        torch.testing.assert_close(values.coef, torch.where(on, alpha * w.reshape(-1)[slots.clamp(min=0)], 0.0))
        torch.testing.assert_close(values.pscale, 1 + 2 * zeta * lse, atol=1e-6, rtol=1e-5)
