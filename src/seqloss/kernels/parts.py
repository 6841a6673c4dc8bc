"""Support rules → kernel launches: parts and their launch shapes.

A plan's members are turned into *parts*, each one launch of the kernels in ``support_ce.py``:

* a full part — every listed position scores all V ids, minus an exclusion bitmap (one row of V
  flags per row or sequence);
* a list part — positions grouped by the list they share (a batch row for (B, 1, K) lists, a single
  position for (B, N, K) lists), scoring the label plus the list's ids.

``finish.py`` turns each part's statistics into losses; the kernels never see objectives or mixtures.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..plan import Plan, mostly, sequence_groups


@dataclass
class Part:
    """One launch: G groups of M slots, each slot a flat position (-1 = empty), and the columns they score."""

    slot_positions: Tensor         # (G, M) long
    positions: Tensor              # (B, N) bool: the positions this part scores
    cols: Optional[Tensor] = None  # (G, K) long ids, PAD = -1; None = all V ids
    bitmap: Optional[Tensor] = None  # (L, V) int8, 1 = excluded id
    brows: Optional[Tensor] = None   # (G, M) long: the bitmap row of each slot
    covers_all: bool = False         # every position of the batch is a slot (weight 0 where off)

    @property
    def slots(self) -> Tensor:
        return self.slot_positions.reshape(-1)


@dataclass(frozen=True)
class Blocks:
    """Launch shape: tile sizes, how many programs share a slot's columns in the stats pass, and
    the warps and pipeline stages of each program (None: Triton's defaults)."""

    m: int
    c: int
    h: int
    splits: int
    warps: Optional[int] = None
    stages: Optional[int] = None
    fallback: Optional[Blocks] = None  # the launch shape to use where this one's kernel does not fit the GPU

    def launch(self) -> dict:
        """The launch keywords Triton takes besides the kernel's own."""
        out = {} if self.warps is None else dict(num_warps=self.warps)
        return out if self.stages is None else dict(out, num_stages=self.stages)


# For profiling on a GPU: "m,c,h[,warps,stages]" replaces the fused head's tile shape
# (benchmarks/bench_gpu.py --blocks sweeps several in one run).
BLOCKS_VARIABLE = "SEQLOSS_FUSED_BLOCKS"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_override() -> Optional[tuple[int, ...]]:
    """The fused head's tile shape from ``SEQLOSS_FUSED_BLOCKS``, or None when unset."""
    text = os.environ.get(BLOCKS_VARIABLE)
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (3, 5) or any(v <= 0 or v & (v - 1) for v in values[:3]) or min(values) <= 0:
        raise ValueError(f"{BLOCKS_VARIABLE} must be 'm,c,h' or 'm,c,h,warps,stages' (tile sizes powers of "
                         f"two), got {text!r}")
    return values


def accumulator_dtype(dtype: torch.dtype, device: torch.device, exact: bool) -> torch.dtype:
    """The dtype the fused head's hidden and weight gradients accumulate in: the compute dtype where
    the GPU adds it atomically in hardware (bf16 from sm_90, fp16 from sm_70) and under the
    interpreter; fp32 with ``exact``, for fp32 inputs, and where the atomics would be compare-and-swap
    loops (bf16 before Hopper)."""
    if exact or dtype == torch.float32:
        return torch.float32
    if device.type == "cuda":
        native = (9, 0) if dtype == torch.bfloat16 else (7, 0)
        if torch.cuda.get_device_capability(device) < native:
            return torch.float32
    return dtype


# The fused head's tile on Hopper (m, c, h, warps, stages) for bf16/fp16 parts of many slots: on an
# H200 the full-vocabulary MLE at Llama-3-8B's head took 45 ms with it against 65 ms with the 64 × 128
# tile (benchmarks/profile_gpu.py's sweep, benchmarks/RESULTS.md). A kernel variant it does not fit
# (shared memory: fp32 operands, some Triton versions' fp32 atomics) falls back to the small tile.
HOPPER_FUSED_TILE = (128, 256, 64, 8, 3)


def fused_tiles(slots: int, capability: tuple[int, int],
                large: bool = True) -> tuple[int, int, int, Optional[int], Optional[int]]:
    """(m, c, h, warps, stages) of the fused head's kernels for a part of ``slots`` slots per group on
    a GPU of compute ``capability`` (None: Triton's default warps and stages); ``large=False`` keeps
    the small tile."""
    if large and slots >= 128 and capability >= (9, 0):
        return HOPPER_FUSED_TILE
    return (64 if slots >= 64 else 16), 128, 64, None, None


def blocks_for(part: Part, columns: int, fused: bool, device: torch.device, large: bool = True) -> Blocks:
    """Tile sizes for a part. Under the interpreter: small tiles and two splits, so that tests at
    small shapes go through every loop and the split merge. On a GPU: tensor-core tiles for the
    fused head (or ``SEQLOSS_FUSED_BLOCKS``'s) — the large Hopper tile where ``large`` allows it, with
    the small one as its ``fallback`` —, wide rows for the logits path, and enough splits to fill the
    multiprocessors."""
    G, M = part.slot_positions.shape
    if interpreting():
        m = 16 if fused else 4
        c, h = 16, 16
        return Blocks(m, c, h, splits=2 if columns > c else 1)
    m, c, h, warps, stages = 4, 2048, 64, None, None
    fallback = None
    if fused:
        override = fused_override()
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
        m, c, h, warps, stages = fused_tiles(M, capability, large) if override is None else (
            *override[:3], *(override[3:] if len(override) == 5 else (None, None)))
        if override is None and (m, c, h, warps, stages) != fused_tiles(M, capability, False):
            fallback = blocks_for(part, columns, fused, device, large=False)
    c = min(c, max(16, 1 << max(columns - 1, 1).bit_length()))
    programs = G * -(-M // m)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    blocks = -(-columns // c)
    return Blocks(m, c, h, splits=max(1, min(blocks, -(-4 * sms // programs))), warps=warps, stages=stages,
                  fallback=fallback)


def _bitmap(exclude: Tensor, vocab_size: int) -> Tensor:
    """(L, K) PAD-padded exclusion lists → (L, V) int8 flags."""
    counts = torch.zeros(exclude.shape[0], vocab_size, dtype=torch.int32, device=exclude.device)
    counts.scatter_add_(1, exclude.clamp(min=0), (exclude >= 0).to(torch.int32))
    return (counts > 0).to(torch.int8)


def full_part(exclude: Optional[Tensor], positions: Tensor, vocab_size: int, cover_all: bool,
              sequence: Optional[Tensor] = None) -> Part:
    """Positions (B, N) bool scoring every id but ``exclude``; with ``cover_all`` (and most positions
    set) every position becomes a slot, so that the launch writes every row of a fresh gradient.
    ``sequence`` (B, N): the list of each position among per-sequence exclusions (see ``Plan.sequence``)."""
    B, N = positions.shape
    every = cover_all and mostly(positions)
    flat = torch.arange(B * N, device=positions.device) if every else positions.reshape(-1).nonzero().squeeze(1)
    part = Part(flat.unsqueeze(0), positions, covers_all=every)
    if exclude is not None:
        part.bitmap = _bitmap(exclude, vocab_size)
        slots = part.slot_positions
        part.brows = slots // N if sequence is None else sequence.reshape(-1)[slots]
    return part


def list_part(ids: Tensor, positions: Tensor, sequence: Optional[Tensor] = None) -> Part:
    """Positions (B, N) bool scoring their label plus ``ids`` (B, 1, K) per row, (B, N, K) per
    position, or (S, 1, K) lists of the sequences ``sequence`` (B, N) maps positions to."""
    B, N = positions.shape
    flat = torch.arange(B * N, device=positions.device).reshape(B, N)
    rows = torch.where(positions, flat, -1)
    if ids.shape[1] == 1 and sequence is not None:
        return Part(sequence_groups(sequence, positions, ids.shape[0])[0], positions, cols=ids[:, 0].contiguous())
    if ids.shape[1] == 1:
        return Part(rows, positions, cols=ids[:, 0].contiguous())
    return Part(rows.reshape(B * N, 1), positions, cols=ids.reshape(B * N, ids.shape[-1]).contiguous())


def parts_of(plan: Plan, vocab_size: int, cover_first: bool) -> Iterator[tuple[float, Part]]:
    """(weight, part) for every launch the plan needs; with ``cover_first`` the first part may
    cover every position (see ``full_part``)."""
    for i, part in enumerate(plan.parts):
        if part.ids is None:
            yield part.alpha, full_part(part.exclude, part.positions, vocab_size, cover_first and i == 0,
                                        plan.sequence)
        else:
            yield part.alpha, list_part(part.ids, part.positions, plan.sequence)


def slot_values(part: Part, per_position: Tensor) -> Tensor:
    """A (B, N) per-position tensor read at every slot (0 at empty slots)."""
    slots = part.slots
    values = per_position.reshape(-1)[slots.clamp(min=0)]
    return torch.where(slots >= 0, values, torch.zeros((), dtype=values.dtype, device=values.device))
