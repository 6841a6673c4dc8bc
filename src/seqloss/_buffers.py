"""Gradient buffers: zero tensors that are cheap to fault in, reused CPU workspaces (within a
per-process byte budget), and the fused head's fp32 accumulators.

Shared by the torch engines and the Triton engines (so it sits below both).
"""
from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def anonymous_maps() -> bool:
    """Whether this platform can give anonymous private memory maps (POSIX: yes; Windows: no)."""
    return hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")


# Read at every call, so a test can force the fallback.
USE_ANONYMOUS_MAPS = anonymous_maps()


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, huge_pages: bool = True) -> Tensor:
    """A zero tensor for a gradient buffer.

    On CPU, where the platform has anonymous maps, it is such a map advised for transparent huge
    pages where the kernel offers them: the kernel hands out pages already zeroed (no memset pass),
    and with huge pages a 128 MiB buffer takes ~64 page faults instead of ~32,000 — which, for the
    sparse gradients of list supports, is most of the cost. (The fused head's large buffers are
    ``workspace`` maps, kept between calls.) ``huge_pages=False`` leaves the map in small pages,
    for a buffer of which only a few scattered rows are ever written (sampled softmax): each write
    then faults in 4 KiB, not 2 MiB.
    Elsewhere (GPUs, Windows, empty shapes), ``torch.zeros``.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0 or not USE_ANONYMOUS_MAPS:
        return torch.zeros(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size(),
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)  # keeps the map alive


def _budget_from_environment() -> int:
    """The budget in bytes: ``SEQLOSS_WORKSPACE_BYTES`` if set (0 keeps nothing), else 512 MiB."""
    text = os.environ.get("SEQLOSS_WORKSPACE_BYTES")
    try:
        return max(0, int(text)) if text else 512 << 20
    except ValueError:
        raise ValueError(f"SEQLOSS_WORKSPACE_BYTES must be a number of bytes, got {text!r}") from None


class _Workspace:
    """An anonymous map and a weak reference to the memoryview its handed-out tensors hold."""

    def __init__(self, nbytes: int) -> None:
        self.region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.region.madvise(mmap.MADV_HUGEPAGE)
        self.nbytes = nbytes
        self.user: Optional[weakref.ref] = None

    def free(self) -> bool:
        """Whether no tensor made from this map is alive: then its contents are nobody's."""
        return self.user is None or self.user() is None

    def hand_out(self, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> Tensor:
        view = memoryview(self.region)[:nbytes]
        self.user = weakref.ref(view)  # dies with the storage, i.e. with the last tensor that uses it
        # A tensor of its own on the storage, not a view of a flat one (nor holding a Python storage
        # object): autograd adds a second gradient in place only into a tensor that is the sole user
        # of its storage (a tied embedding's, into the head's weight gradient).
        out = torch.empty(0, dtype=dtype)  # set_(a tensor) is documented but missing from torch's stubs
        return out.set_(torch.frombuffer(view, dtype=dtype)).resize_(shape)  # type: ignore[call-overload]


class _Pool:
    """The workspaces kept for reuse by every thread of the process, at most ``budget`` bytes of
    them (most recently used last). A map in use stays alive with its tensors whether or not the pool
    keeps it; one the pool drops is unmapped when its last tensor dies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.workspaces: list[_Workspace] = []
        self.budget = _budget_from_environment()

    def kept_bytes(self) -> int:
        return sum(w.nbytes for w in self.workspaces)

    def keep(self, found: _Workspace) -> None:
        """Keep ``found`` as the most recently used, dropping the least recently used over budget."""
        if found.nbytes > self.budget:
            return
        self.workspaces.append(found)
        while self.kept_bytes() > self.budget:
            self.workspaces.pop(0)


_POOL = _Pool()


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, bool]:
    """A tensor for the fused head's weight gradient or scratch, and whether it is known to be zero.

    On CPU (with anonymous maps) the memory is a map that may be kept for the next call, as CUDA's
    caching allocator keeps its blocks: a fresh map's pages are faulted in and zeroed by the kernel
    on first touch, which, after other large allocations and frees (a training step's), costs
    several times the fused head's arithmetic. A map is reused only when no tensor made from it is
    alive (a gradient the caller still holds is never overwritten), and only for a request of
    between half and all of its size; reused contents are stale (``False``), a fresh map is zero
    (``True``). The process keeps at most ``set_workspace_budget`` bytes of maps (512 MiB by
    default): a larger one, such as a Llama-3-sized head's weight gradient, is never kept.
    Elsewhere (GPUs, whose allocator caches already; Windows) ``torch.empty``, stale.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0 or not USE_ANONYMOUS_MAPS:
        return torch.empty(shape, dtype=dtype, device=device), False
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    with _POOL.lock:
        reusable = [w for w in _POOL.workspaces if w.free() and nbytes <= w.nbytes <= 2 * nbytes]
        if reusable:
            found, is_zero = min(reusable, key=lambda w: w.nbytes), False
            _POOL.workspaces.remove(found)
        else:
            found, is_zero = _Workspace(nbytes), True
        _POOL.keep(found)
        return found.hand_out(shape, dtype, nbytes), is_zero


def release_workspaces() -> None:
    """Drop every kept workspace, whichever thread used it (its memory returns to the system once no
    tensor uses it)."""
    with _POOL.lock:
        _POOL.workspaces.clear()


def set_workspace_budget(nbytes: int) -> int:
    """Keep at most ``nbytes`` of CPU workspaces between fused-head calls (0: keep none; the default
    is 512 MiB, or ``SEQLOSS_WORKSPACE_BYTES``); returns the previous budget. Kept maps over the new
    budget are dropped at once."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    with _POOL.lock:
        previous, _POOL.budget = _POOL.budget, nbytes
        while _POOL.kept_bytes() > nbytes:
            _POOL.workspaces.pop(0)
    return previous


def kept_workspace_bytes() -> int:
    """How many bytes of CPU workspaces the process keeps now."""
    with _POOL.lock:
        return _POOL.kept_bytes()


def narrowed(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` for a contiguous fp32 ``t`` and a 2-byte ``dtype``, written over ``t``'s own
    memory: no second buffer of its size. In four chunks, each read before it is written, and each
    written only over fp32 entries already read (chunk [s, s+c) lands on bytes [2s, 2s+2c), entries
    [s/2, (s+c)/2) ⊂ [0, s+c)). The result is a view of that memory (it keeps all of it alive)."""
    flat = t.reshape(-1)
    out = flat.view(dtype)[:flat.numel()]
    chunk = max(1, -(-flat.numel() // 4))
    for start in range(0, flat.numel(), chunk):
        out[start:start + chunk].copy_(flat[start:start + chunk].to(dtype))
    return out.view(t.shape)


@dataclass
class Grads:
    """The fused head's accumulators of the three gradients (None where none is wanted).

    The hidden gradient (positions × H) and the bias accumulate in fp32: each hidden row sums one
    term per vocabulary tile (hundreds at 128k ids), which bf16 would round hundreds of times. ``dtype``
    is the weight's (V × H, the largest: fp32 by default; the Triton engine accumulates it in bf16/fp16
    unless asked for exact accumulation), allocated by its first update, from ``zeros``.
    """

    hidden: Optional[Tensor]
    bias: Optional[Tensor]
    want_weight: bool
    shape: tuple[int, int]
    weight: Optional[Tensor] = None
    dtype: torch.dtype = torch.float32

    @classmethod
    def allocate(cls, positions: int, width: int, vocab_size: int, device: torch.device, want: bool,
                 need: tuple[bool, bool, bool], dtype: torch.dtype = torch.float32) -> Grads:
        """Zeroed accumulators for the gradients ``need`` asks for (hidden, weight, bias), if ``want``."""
        return cls(zeros((positions, width), torch.float32, device) if want and need[0] else None,
                   zeros((vocab_size,), torch.float32, device) if want and need[2] else None, want and need[1],
                   (vocab_size, width), dtype=dtype)

    def weight_buffer(self, device: torch.device, zero: bool = True) -> bool:
        """Allocate the weight gradient on first use, from a reused ``workspace``, zeroed — or with
        ``zero=False`` as it comes (the caller then writes every entry, or calls ``zero_weight``).
        False only for a fresh buffer left stale."""
        if self.weight is not None:
            return True
        self.weight, is_zero = workspace(self.shape, self.dtype, device)
        if zero and not is_zero:
            self.weight.zero_()
        return zero or is_zero

    def zero_weight(self) -> None:
        """Zero a weight gradient allocated with ``weight_buffer(zero=False)``."""
        if self.weight is not None:
            self.weight.zero_()

    def add_dense(self, idx: Tensor, z: Tensor, h: Tensor, weight: Tensor) -> None:
        """Gradients from full rows: positions ``idx`` (C,), z (C, V) fp32 = dloss/dlogits, h (C, H)."""
        g = z.to(weight.dtype)
        self.add_hidden_rows(idx, g @ weight)
        if self.want_weight:
            # A first update writes every entry: it overwrites a reused workspace instead of zeroing it.
            first = self.weight is None
            if self.weight is None:
                self.weight = workspace(self.shape, torch.float32, g.device)[0]
            if g.dtype == torch.float32:
                self.weight.addmm_(g.t(), h, beta=0 if first else 1)  # beta=0 ignores stale NaN/inf
            elif first:
                self.weight.copy_(g.t() @ h)
            else:
                self.weight.add_((g.t() @ h).float())
        if self.bias is not None:
            self.bias.add_(z.sum(0))

    def add_weight_rows(self, index: Tensor, rows: Tensor) -> None:
        """weight[index] += rows, repeated indices accumulating."""
        self.weight_buffer(rows.device)
        assert self.weight is not None
        self.weight.index_add_(0, index, rows.to(self.weight.dtype))

    def add_hidden_rows(self, index: Tensor, rows: Tensor) -> None:
        """hidden[index] += rows."""
        if self.hidden is not None:
            self.hidden.index_add_(0, index, rows.to(self.hidden.dtype))

    def add_hidden_range(self, first: int, rows: Tensor) -> None:
        """hidden[first:first + len(rows)] += rows (fp32 rows into a bf16/fp16 buffer: rounded once)."""
        if self.hidden is not None:
            self.hidden[first:first + rows.shape[0]].add_(rows)

    def results(self, inputs: Sequence[Optional[Tensor]]) -> GradTriple:
        """The (hidden, weight, bias) gradients, each in its input's dtype and shape (None where not
        computed). Not a view where the shapes agree: autograd adds a tied weight's other gradient in
        place only into a tensor that is the sole user of its memory (else a third V × H buffer). The
        hidden gradient, which the layers below consume at once, is narrowed in its own memory."""
        def result(g: Optional[Tensor], x: Optional[Tensor], in_place: bool) -> Optional[Tensor]:
            if g is None or x is None:
                return None
            if in_place and x.element_size() == 2:
                return narrowed(g, x.dtype).view_as(x)
            return (g if g.shape == x.shape else g.view_as(x)).to(x.dtype)

        return (result(self.hidden, inputs[0], True), result(self.weight if self.want_weight else None, inputs[1], False),
                result(self.bias, inputs[2], False))


GradTriple = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]


def in_compute_dtype(inputs: Sequence[Optional[Tensor]],
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The fused head's (hidden, weight, bias) in the dtype its matmuls run in."""
    hidden, weight, bias = inputs
    assert hidden is not None and weight is not None
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
