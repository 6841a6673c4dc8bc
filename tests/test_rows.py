"""The per-position math shared by the logits path and the fused head, against autograd on the
dense formula ``lse_S(z) - (1-ε)·z_y - ε·mean_S(z)``."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from seqloss.rows import candidates, full_rows, list_rows
from seqloss.support import canonical_ids
from tests.conftest import assert_close_fp32, generator


def dense_loss_and_grad(z, support, y, eps, w):
    """Loss (C, 1) and d(Σ w·loss)/dz over a boolean support (C, V) that contains y."""
    z = z.clone().requires_grad_(True)
    masked = z.masked_fill(~support, float("-inf"))
    lse = torch.logsumexp(masked, 1, keepdim=True)
    z_y = z.gather(1, y)
    mean_s = z.masked_fill(~support, 0.0).sum(1, keepdim=True) / support.sum(1, keepdim=True)
    loss = lse - (1 - eps) * z_y - eps * mean_s
    (loss * w).sum().backward()
    return loss.detach(), z.grad


@settings(max_examples=50, deadline=None)
@given(C=st.integers(1, 5), V=st.integers(1, 30), K=st.integers(0, 6), eps=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2**16), with_exclude=st.booleans())
def test_full_rows(C, V, K, eps, seed, with_exclude):
    g = generator(seed)
    z = torch.randn(C, V, generator=g) * 3
    y = torch.randint(V, (C, 1), generator=g)
    w = torch.rand(C, 1, generator=g)
    # callers pass canonical lists (each id once, PAD-padded), as support.canonical_ids makes them
    exclude = canonical_ids(torch.randint(-2, V, (C, K), generator=g)) if with_exclude else None
    support = torch.ones(C, V + 1, dtype=torch.bool)                   # spare column for padding
    if exclude is not None:
        support.scatter_(1, torch.where(exclude < 0, V, exclude), False)
    support = support[:, :V].scatter(1, y, True)                       # the label is never excluded
    want, want_grad = dense_loss_and_grad(z, support, y, eps, w)
    work = z.clone()
    got = full_rows(work, y, exclude, eps, w)
    assert_close_fp32(got, want)
    assert_close_fp32(work, want_grad, "backward")  # the copy is left holding the gradient
    assert_close_fp32(full_rows(z.clone(), y, exclude, eps, None), want)


def test_candidates_put_the_label_last_and_drop_padding_and_repeats():
    ids = torch.tensor([[[3, 5, -1]], [[4, -1, -1]]]).expand(2, 2, 3)
    y = torch.tensor([[[5], [7]], [[4], [1]]])
    positions = torch.tensor([[True, True], [True, False]])
    cand, valid = candidates(ids, y, positions)
    assert cand.tolist() == [[[3, 5, 0, 5], [3, 5, 0, 7]], [[4, 0, 0, 4], [4, 0, 0, 1]]]
    assert valid.tolist() == [[[True, False, False, True], [True, True, False, True]],
                              [[False, False, False, True], [False, False, False, False]]]


@settings(max_examples=50, deadline=None)
@given(C=st.integers(1, 5), K=st.integers(0, 6), eps=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**16))
def test_list_rows(C, K, eps, seed):
    g = generator(seed)
    z = torch.randn(C, K + 1, generator=g) * 3
    valid = torch.rand(C, K + 1, generator=g) < 0.7
    valid[:, -1] = True
    valid[0] = False  # an inactive position: no loss, no gradient
    w = torch.rand(C, 1, generator=g)
    y = torch.full((C, 1), K)
    support = valid.clone()
    support[0, -1] = True  # keep the oracle finite on the inactive row; its result is discarded
    want, want_grad = dense_loss_and_grad(z, support, y, eps, w)
    want[0], want_grad[0] = 0.0, 0.0
    got, got_grad = list_rows(z, valid, eps, w)
    assert_close_fp32(got, want)
    assert_close_fp32(got_grad, want_grad, "backward")
    assert list_rows(z, valid, eps, None)[1] is None
