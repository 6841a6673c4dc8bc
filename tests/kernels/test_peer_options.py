"""The peers' options on the Triton kernels (interpreted on CPU), against the dense spec: class
weights, soft-capping (capped in the fused head's tiles; before the kernels on the logits path) and
the z-loss, on both paths, values and gradients."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from seqloss import kernels  # noqa: E402
from tests.test_peer_options import OBJECTIVES, _assert_same, _inputs, _objective, _on_head, _on_logits  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None,
                                reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1")

OPTIONS = {
    "class_weight": dict(class_weight=torch.rand(17, generator=torch.Generator().manual_seed(1)) * 2),
    "softcap": dict(softcap=3.0),
    "z_loss": dict(z_loss=0.05),
    "all": dict(softcap=2.5, z_loss=0.01, label_smoothing=0.1),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("name", OBJECTIVES)
def test_peer_options_on_the_kernels_equal_the_spec(name, option):
    logits, hidden, weight, bias, labels = _inputs(OBJECTIVES.index(name))
    objective, extra = _objective(name)
    options = dict(shift=True, **OPTIONS[option], **extra)
    reduction = ("mean", "none")[OBJECTIVES.index(name) % 2]
    on_logits = {("weight" if key == "class_weight" else key): value for key, value in options.items()}
    runs = [_on_logits(impl, logits, labels, objective, reduction=reduction, **on_logits)
            for impl in ("triton", "reference")]
    _assert_same(*runs)
    runs = [_on_head(impl, hidden, weight, bias, labels, objective, reduction=reduction, **options)
            for impl in ("triton", "reference")]
    _assert_same(*runs)
