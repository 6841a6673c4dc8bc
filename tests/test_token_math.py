"""The per-position math shared by the torch engines, against autograd on the dense formula
``lse_S(c) - (1-ε)·c_y - ε·mean_S(c) + ζ·lse_S(c)²`` of the soft-capped logits c = cap·tanh(z / cap)."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from seqloss.call import SoftmaxOptions
from seqloss.support import canonical_ids
from seqloss.token_math import PositionSums, TokenTerms, candidate_support, candidates, full_support
from tests.conftest import assert_close_fp32, generator


def dense_loss_and_grad(z, support, y, softmax, w):
    """Loss (C, 1), its z-loss term and d(Σ w·loss)/dz over a boolean support (C, V) that contains y."""
    eps, zeta, cap = softmax
    leaf = z.clone().requires_grad_(True)
    z = cap * torch.tanh(leaf / cap) if cap else leaf
    masked = z.masked_fill(~support, float("-inf"))
    lse = torch.logsumexp(masked, 1, keepdim=True)
    z_y = z.gather(1, y)
    mean_s = z.masked_fill(~support, 0.0).sum(1, keepdim=True) / support.sum(1, keepdim=True)
    loss = lse - (1 - eps) * z_y - eps * mean_s + zeta * lse ** 2
    (loss * w).sum().backward()
    return loss.detach(), (zeta * lse ** 2).detach(), leaf.grad


def softmax_options():
    return st.builds(SoftmaxOptions, st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 1e-2]),
                     st.sampled_from([0.0, 2.5]))


@settings(max_examples=60, deadline=None)
@given(C=st.integers(1, 5), V=st.integers(1, 30), K=st.integers(0, 6), softmax=softmax_options(),
       seed=st.integers(0, 2**16), with_exclude=st.booleans())
def test_full_support(C, V, K, softmax, seed, with_exclude):
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
    want, want_z, want_grad = dense_loss_and_grad(z, support, y, softmax, w)
    work = z.clone()
    got = full_support(work, y, exclude, w, softmax, predict=True)
    assert_close_fp32(got.loss, want)
    assert_close_fp32(work, want_grad, "backward")  # the copy is left holding the gradient
    assert (got.z_term is None) == (softmax.z_loss == 0)
    if got.z_term is not None:
        assert_close_fp32(got.z_term, want_z)
    capped = softmax.softcap * torch.tanh(z / softmax.softcap) if softmax.softcap else z
    assert torch.equal(got.predicted, capped.argmax(1)), "argmax over every id, excluded ones too"
    again = full_support(z.clone(), y, exclude, None, softmax)
    assert_close_fp32(again.loss, want)
    assert again.predicted is None


def test_candidates_put_the_label_last_and_drop_padding_and_repeats():
    ids = torch.tensor([[[3, 5, -1]], [[4, -1, -1]]]).expand(2, 2, 3)
    y = torch.tensor([[[5], [7]], [[4], [1]]])
    positions = torch.tensor([[True, True], [True, False]])
    cand, valid = candidates(ids, y, positions)
    assert cand.tolist() == [[[3, 5, 0, 5], [3, 5, 0, 7]], [[4, 0, 0, 4], [4, 0, 0, 1]]]
    assert valid.tolist() == [[[True, False, False, True], [True, True, False, True]],
                              [[False, False, False, True], [False, False, False, False]]]


@settings(max_examples=60, deadline=None)
@given(C=st.integers(1, 5), K=st.integers(0, 6), softmax=softmax_options(), seed=st.integers(0, 2**16))
def test_candidate_support(C, K, softmax, seed):
    g = generator(seed)
    z = torch.randn(C, K + 1, generator=g) * 3
    valid = torch.rand(C, K + 1, generator=g) < 0.7
    valid[:, -1] = True
    valid[0] = False  # an inactive position: no loss, no gradient
    w = torch.rand(C, 1, generator=g)
    y = torch.full((C, 1), K)
    support = valid.clone()
    support[0, -1] = True  # keep the oracle finite on the inactive row; its result is discarded
    want, want_z, want_grad = dense_loss_and_grad(z, support, y, softmax, w)
    want[0], want_z[0], want_grad[0] = 0.0, 0.0, 0.0
    before = z.clone()
    got, got_grad = candidate_support(z.clone(), valid, w, softmax)
    assert_close_fp32(got.loss, want)
    assert_close_fp32(got_grad, want_grad, "backward")
    if softmax.z_loss:
        assert_close_fp32(got.z_term, want_z)
    assert candidate_support(z.clone(), valid, None, softmax)[1] is None
    assert torch.equal(z, before)


def test_position_sums_add_weighted_terms_where_on():
    sums = PositionSums(4, torch.device("cpu"), stats=True)
    terms = TokenTerms(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[0.1], [0.2], [0.3]]), torch.tensor([7, 8, 9]))
    sums.add(torch.tensor([0, 2, 3]), 0.5, terms, on=torch.tensor([True, False, True]))
    assert sums.loss.tolist() == [0.5, 0.0, 0.0, 1.5]
    assert_close_fp32(sums.z_part, torch.tensor([0.05, 0.0, 0.0, 0.15]))
    assert sums.predicted.tolist() == [7, 0, 0, 9]
    assert sums.unpredicted(torch.tensor([True, True, True, False])).tolist() == [1, 2]
    plain = PositionSums(2, torch.device("cpu"), stats=False)
    plain.add(torch.tensor([1]), 1.0, TokenTerms(torch.tensor([[4.0]]), None, torch.tensor([3])))
    assert plain.loss.tolist() == [0.0, 4.0] and plain.z_part is None and plain.predicted is None
