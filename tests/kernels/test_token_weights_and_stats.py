"""The Triton kernels (Triton's interpreter on CPU tensors) with per-position ``token_weights`` and
with ``return_stats`` — the z-loss part and the argmax over the whole vocabulary from the statistics
pass itself — against the dense spec, on the logits path and the fused head."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import seqloss  # noqa: E402
from seqloss import kernels  # noqa: E402
from tests.conftest import OBJECTIVES_AND_MIXTURE, assert_close_fp32, make_labels, make_logits, objective_of, options_of  # noqa: E402
from tests.test_token_weights import _grads, _same, weights_like  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None,
                                reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1")

B, N, V, H = 2, 7, 37, 16


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_token_weights_on_the_kernels_equal_the_spec(name, reduction):
    seed = OBJECTIVES_AND_MIXTURE.index(name)
    labels = make_labels(B, N, vocab_size=V, seed=seed)
    logits = make_logits(B, N, V, seed=seed)
    hidden, head = make_logits(B, N, H, seed=seed + 1, scale=1.0), make_logits(V, H, seed=seed + 2, scale=0.5)
    common = dict(shift=True, reduction=reduction, token_weights=weights_like(labels, seed))
    runs = [_grads(lambda z, impl=impl: seqloss.objective_loss(z, labels, objective_of(name), impl=impl, **common,
                                                    **options_of(name, labels, V, seed)), logits)
            for impl in ("triton", "reference")]
    _same(*runs)
    runs = [_grads(lambda h, w, impl=impl: seqloss.linear_loss(h, w, labels, objective=objective_of(name), impl=impl, **common,
                                                    **options_of(name, labels, V, seed)), hidden, head)
            for impl in ("triton", "reference")]
    _same(*runs)


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("name", ["mle", "smile", "reverse_subset", "selective_eos", "mixture"])
def test_stats_come_from_the_kernels_pass(name, path):
    # Full parts find the argmax in their statistics pass (excluded ids included); SMILE's list
    # positions get one statistics pass over the vocabulary for it.
    seed = 7 + len(name)
    labels = make_labels(B, N, vocab_size=V, seed=seed)
    logits = make_logits(B, N, V, seed=seed)
    hidden, head = make_logits(B, N, H, seed=seed + 1, scale=1.0), make_logits(V, H, seed=seed + 2, scale=0.5)
    options = dict(shift=True, z_loss=0.05, softcap=4.0, return_stats=True)
    if name == "selective_eos":
        options["eos_token_id"] = int(torch.cat([logits, hidden @ head.t()]).argmax(-1)[0, 0])  # an excluded argmax
    if name == "reverse_subset":
        options["exclude_ids"] = (1,)
    stats = {}
    for impl in ("triton", "reference"):
        if path == "logits":
            stats[impl] = seqloss.objective_loss(logits, labels, objective_of(name), impl=impl, **options)
        else:
            stats[impl] = seqloss.linear_loss(hidden, head, labels, objective=objective_of(name), impl=impl, **options)
    got, want = stats["triton"], stats["reference"]
    assert_close_fp32(got.loss, want.loss)
    assert_close_fp32(got.z_loss, want.z_loss)
    assert torch.equal(got.predicted_ids, want.predicted_ids)
    assert_close_fp32(got.token_accuracy, want.token_accuracy)
