"""The list parts' candidate softmax kernel (Triton's interpreter, CPU tensors) against its torch twin
``grouped.torch_candidate_rows``, whose own values the engine tests hold to the dense spec: terms and
both gradients, for lists with padding, labels in and outside their list, positions off, bias, label
smoothing, z-loss, soft-capping and folding, over random shapes (hypothesis)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

pytest.importorskip("triton")

from seqloss import kernels  # noqa: E402
from seqloss.call import SoftmaxOptions  # noqa: E402
from seqloss.grouped import torch_candidate_rows  # noqa: E402
from seqloss.kernels.candidates import candidate_rows  # noqa: E402
from seqloss.token_math import PositionSums  # noqa: E402
from tests.conftest import generator  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None,
                                reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1")


def _case(seed: int, groups: int, M: int, K: int, V: int, bias: bool, weights: bool):
    g = generator(seed)
    listed = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(groups)])
    listed[torch.rand(groups, K, generator=g) < 0.2] = -1                   # padding anywhere in a list
    pick = listed.clamp(min=0)[torch.arange(groups).unsqueeze(1), torch.randint(K, (groups, M), generator=g)]
    y = torch.where(torch.rand(groups, M, generator=g) < 0.6, pick, torch.randint(V, (groups, M), generator=g))
    on = torch.rand(groups, M, generator=g) < 0.8
    z_list = torch.randn(groups, M, K, generator=g) * 3
    z_y = torch.randn(groups, M, 1, generator=g) * 3
    b = torch.randn(V, generator=g) if bias else None
    w = torch.rand(groups, M, 1, generator=g) if weights else None
    return z_list, z_y, listed, y.unsqueeze(-1), on, b, w


def _run(rows, case, softmax: SoftmaxOptions, fold: bool, dtype: torch.dtype, alpha: float = 1.0):
    """``rows`` on a case → the sums it added to (losses, z-loss terms) and the two gradients."""
    z_list = case[0]
    count = z_list.shape[0] * z_list.shape[1]
    sums = PositionSums(count + 3, z_list.device, stats=True)
    index = torch.randperm(count + 3, generator=generator(count))[:count]     # positions in any order
    g_list, g_y = rows(*case, softmax, fold, dtype, sums, index, alpha)
    return sums, g_list, g_y


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.integers(1, 3), M=st.integers(1, 5), K=st.integers(1, 40),
       bias=st.booleans(), weights=st.booleans(), fold=st.booleans(), alpha=st.sampled_from([1.0, 0.3]),
       eps=st.sampled_from([0.0, 0.1]), zeta=st.sampled_from([0.0, 1e-3]), cap=st.sampled_from([0.0, 4.0]))
def test_the_kernel_equals_its_torch_twin(seed, groups, M, K, bias, weights, fold, alpha, eps, zeta, cap):
    case = _case(seed, groups, M, K, V=max(K, 50), bias=bias, weights=weights)
    softmax = SoftmaxOptions(label_smoothing=eps, z_loss=zeta, softcap=cap)
    want = _run(torch_candidate_rows, case, softmax, fold, torch.float32, alpha)
    got = _run(candidate_rows, case, softmax, fold, torch.float32, alpha)
    torch.testing.assert_close(got[0].loss, want[0].loss, atol=1e-5, rtol=1e-5)
    assert got[0].z_part is not None and want[0].z_part is not None
    torch.testing.assert_close(got[0].z_part, want[0].z_part, atol=1e-5, rtol=1e-5)
    assert (got[1] is None) == (want[1] is None) == (not weights)
    if weights:
        for a, b in zip(got[1:], want[1:]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.integers(1, 3), M=st.integers(1, 5), K=st.integers(1, 40),
       bias=st.booleans(), weights=st.booleans(), eps=st.sampled_from([0.0, 0.1]), cap=st.sampled_from([0.0, 4.0]))
def test_listed_labels_read_their_logits_from_their_columns(seed, groups, M, K, bias, weights, eps, cap):
    """Every scored label in its list (SMILE's token sets): without label logits, the kernel and the
    twin read them from the list's columns and fold their gradients — as the twin given the logits."""
    z_list, _, listed, _, on, b, w = _case(seed, groups, M, K, V=max(K, 50), bias=bias, weights=weights)
    has = (listed >= 0).any(1, keepdim=True)                                # lists all padding score nothing
    pick = torch.multinomial((listed >= 0).float() + ~has, M, replacement=True, generator=generator(seed))
    y = listed.gather(1, pick).clamp(min=0).unsqueeze(-1)                   # (g, M, 1), each in its list
    on = on & has
    z_y = z_list.gather(2, pick.unsqueeze(-1))
    softmax = SoftmaxOptions(label_smoothing=eps, z_loss=1e-3, softcap=cap)
    given_logits = _run(torch_candidate_rows, (z_list, z_y, listed, y, on, b, w), softmax, True, torch.float32)
    for rows in (torch_candidate_rows, candidate_rows):
        got = _run(rows, (z_list, None, listed, y, on, b, w), softmax, False, torch.float32)
        torch.testing.assert_close(got[0].loss, given_logits[0].loss, atol=1e-5, rtol=1e-5)
        assert got[2] is None, "no label gradient: it is folded into the label's column"
        if weights:
            torch.testing.assert_close(got[1], given_logits[1], atol=1e-6, rtol=1e-5)
            assert not given_logits[2].any(), "the twin given the logits folds every label too"


def test_the_list_gradient_comes_in_the_products_dtype():
    case = _case(1, 2, 3, 11, 40, bias=False, weights=True)
    sums, g_list, g_y = _run(candidate_rows, case, SoftmaxOptions(), True, torch.bfloat16)
    assert g_list is not None and g_y is not None
    assert g_list.dtype == torch.bfloat16 and g_y.dtype == torch.float32 and sums.loss.dtype == torch.float32
    want = _run(torch_candidate_rows, case, SoftmaxOptions(), True, torch.float32)[1]
    torch.testing.assert_close(g_list.float(), want, atol=1e-2, rtol=2 ** -8)


def test_a_large_list_runs_in_several_blocks_and_an_unsupervised_row_stays_finite():
    case = _case(2, 1, 2, 70, 90, bias=True, weights=True)
    z_y, on = case[1], case[4]
    on[0, 0] = False
    z_y[0, 0] = 500.0  # the logit of a position that is not scored: no overflow may reach its gradient
    softmax = SoftmaxOptions(label_smoothing=0.1)
    sums, g_list, g_y = _run(candidate_rows, case, softmax, True, torch.float32)
    want = _run(torch_candidate_rows, case, softmax, True, torch.float32)
    assert g_list is not None and g_y is not None
    assert all(torch.isfinite(t).all() for t in (sums.loss, g_list, g_y))
    torch.testing.assert_close(g_list, want[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sums.loss, want[0].loss, atol=1e-5, rtol=1e-5)
    assert float(g_y[0, 0]) == 0.0
