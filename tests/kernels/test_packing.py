"""Packed sequences on the Triton kernels (interpreted on CPU): a packed row equals its examples as
rows, and the kernels equal the dense spec on packed rows (per-sequence lists and exclusion bitmaps)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from seqloss import kernels  # noqa: E402
from tests.conftest import assert_close_fp32  # noqa: E402
from tests.test_packing import PACKABLE, check_packed_equals_unpacked, make_batch, make_head, run_with  # noqa: E402
from tests.test_turns import check_turns_equal_copies  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None,
                                reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1")


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("name", PACKABLE)
def test_a_packed_row_equals_its_examples_as_rows(name, path):
    V, H = 13, 6
    shift = PACKABLE.index(name) % 2 == 0
    reduction = ("mean", "none", "sequence")[PACKABLE.index(name) % 3]
    batch = make_batch([4, 2, 5, 3], 2, V if path == "logits" else H, V, seed=PACKABLE.index(name),
                       candidates=3 if name == "subset_per_position" else 0)
    check_packed_equals_unpacked(batch, name, path, "triton", reduction, shift, V, make_head(V, H))


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("name", ["smile", "reverse_subset", "mixture"])
def test_kernels_on_packed_rows_equal_the_spec(name, path):
    V, H = 11, 6
    batch = make_batch([3, 6, 1, 4], 1, V if path == "logits" else H, V, seed=9)
    head = make_head(V, H, seed=9)
    fast = run_with(path, "triton", batch, name, head, shift=True, reduction="none", label_smoothing=0.1)
    spec = run_with(path, "reference", batch, name, head, shift=True, reduction="none", label_smoothing=0.1)
    assert_close_fp32(fast[0], spec[0])
    assert_close_fp32(fast[1], spec[1], "backward")


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("name", ["smile", "reverse_subset", "mixture"])
def test_turns_score_like_one_turn_copies(name, path):
    V, H = 12, 6
    labels = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(4))
    labels[0, [3, 4, 8]] = -100
    labels[1, [0, 6]] = -100
    scores = torch.randn(2, 11, V if path == "logits" else H, generator=torch.Generator().manual_seed(5))
    check_turns_equal_copies(path, "triton", scores, labels, name, make_head(V, H), shift=name != "smile")
