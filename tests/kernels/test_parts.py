"""Support rules → kernel launches: exclusion bitmaps, slots of full and list parts, split merging."""
from __future__ import annotations

import pytest
import torch

from seqloss._validate import check_logits_call
from seqloss.kernels.parts import (
    _bitmap,
    accumulator_dtype,
    blocks_for,
    full_part,
    list_part,
    parts_of,
    slot_values,
)
from seqloss.plan import plan_of
from tests.conftest import make_labels


def test_bitmap_flags_listed_ids_and_ignores_padding():
    exclude = torch.tensor([[3, 0, -1], [-1, -1, -1]])
    bitmap = _bitmap(exclude, 5)
    assert bitmap.dtype == torch.int8
    assert bitmap.tolist() == [[1, 0, 0, 1, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("cover, fraction, covers_all", [(True, 0.0, True), (True, 0.9, False), (False, 0.0, False)])
def test_full_part_covers_every_position_only_when_asked_and_mostly_set(cover, fraction, covers_all):
    positions = make_labels(2, 5, vocab_size=3, ignore_fraction=fraction) >= 0
    part = full_part(None, positions, 3, cover)
    assert part.covers_all == covers_all
    expected = torch.arange(10) if covers_all else positions.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(part.slot_positions, expected.unsqueeze(0))


def test_full_part_bitmap_rows_follow_the_batch_row():
    positions = torch.ones(2, 3, dtype=torch.bool)
    part = full_part(torch.tensor([[1], [2]]), positions, 4, cover_all=False)
    assert part.brows.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert part.bitmap.tolist() == [[0, 1, 0, 0], [0, 0, 1, 0]]


def test_list_parts_group_by_the_shared_list():
    positions = torch.tensor([[True, False, True], [True, True, False]])
    per_row = list_part(torch.tensor([[[4, 5]], [[6, -1]]]), positions)
    assert per_row.slot_positions.tolist() == [[0, -1, 2], [3, 4, -1]] and per_row.cols.tolist() == [[4, 5], [6, -1]]
    per_position = list_part(torch.arange(12).reshape(2, 3, 2), positions)
    assert per_position.slot_positions.tolist() == [[0], [-1], [2], [3], [4], [-1]]
    assert per_position.cols.shape == (6, 2)
    assert slot_values(per_position, torch.arange(6.0).reshape(2, 3)).tolist() == [0, 0, 2, 3, 4, 0]


def test_smile_gives_a_first_token_part_then_a_list_part():
    labels = make_labels(2, 6, vocab_size=9, ignore_fraction=0.0)
    plan = plan_of(check_logits_call({"mle": 0.5, "smile": 0.5}, {}, torch.zeros(2, 6, 9), labels))
    parts = list(parts_of(plan, 9, cover_first=True))
    assert [(alpha, part.cols is None, part.covers_all) for alpha, part in parts] == \
        [(0.5, True, True), (0.5, True, False), (0.5, False, False)]
    assert parts[1][1].slot_positions.tolist() == [[0, 6]]  # SMILE's first supervised position of each row


def test_interpreter_blocks_reach_every_loop(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    part = list_part(torch.zeros(2, 1, 40, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool))
    blocks = blocks_for(part, 40, fused=True, device=torch.device("cpu"))
    assert blocks.c < 40 and blocks.splits == 2


def test_fused_blocks_follow_the_profiling_variable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    part = full_part(None, torch.ones(2, 300, dtype=torch.bool), 5000, cover_all=False)
    assert blocks_for(part, 5000, fused=True, device=torch.device("cpu")).launch() == {}
    monkeypatch.setenv("SEQLOSS_FUSED_BLOCKS", "128,256,32,8,3")
    blocks = blocks_for(part, 5000, fused=True, device=torch.device("cpu"))
    assert (blocks.m, blocks.c, blocks.h, blocks.launch()) == (128, 256, 32, dict(num_warps=8, num_stages=3))
    assert blocks_for(part, 5000, fused=False, device=torch.device("cpu")).m == 4  # the logits path keeps its own
    for bad in ("128,256", "100,256,32", "a,b,c", "128,256,32,0,3"):
        monkeypatch.setenv("SEQLOSS_FUSED_BLOCKS", bad)
        with pytest.raises(ValueError, match="SEQLOSS_FUSED_BLOCKS"):
            blocks_for(part, 5000, fused=True, device=torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter's small tiles whatever is asked
    assert blocks_for(part, 5000, fused=True, device=torch.device("cpu")).m == 16


@pytest.mark.parametrize("dtype, capability, exact, expected", [
    (torch.bfloat16, (9, 0), False, torch.bfloat16),  # Hopper: bf16 atomics in hardware
    (torch.bfloat16, (8, 0), False, torch.float32),   # Ampere: they would be compare-and-swap loops
    (torch.float16, (8, 0), False, torch.float16),
    (torch.bfloat16, (9, 0), True, torch.float32),    # exact_accumulation
    (torch.float32, (9, 0), False, torch.float32),
])
def test_the_fused_head_accumulates_where_the_gpu_adds_in_hardware(monkeypatch, dtype, capability, exact, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert accumulator_dtype(dtype, torch.device("cuda"), exact) == expected
    assert accumulator_dtype(dtype, torch.device("cpu"), exact) == (torch.float32 if exact else dtype)  # interpreter


def test_hopper_takes_the_large_tile_with_the_small_one_to_fall_back_on(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("SEQLOSS_FUSED_BLOCKS", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    part = full_part(None, torch.ones(1, 8192, dtype=torch.bool), 128256, cover_all=False)
    blocks = blocks_for(part, 128256, fused=True, device=cuda)
    assert (blocks.m, blocks.c, blocks.h, blocks.launch()) == (128, 256, 64, dict(num_warps=8, num_stages=3))
    assert blocks.fallback == blocks_for(part, 128256, fused=True, device=cuda, large=False)
    assert (blocks.fallback.m, blocks.fallback.c, blocks.fallback.fallback) == (64, 128, None)
    few = full_part(None, torch.ones(1, 8, dtype=torch.bool), 128256, cover_all=False)
    assert (blocks_for(few, 128256, fused=True, device=cuda).m, blocks_for(few, 128256, True, cuda).fallback) == (16, None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert blocks_for(part, 128256, fused=True, device=cuda) == blocks.fallback  # before Hopper: the small tile
