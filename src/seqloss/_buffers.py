"""Gradient buffers: zero tensors that are cheap to fault in, reused CPU workspaces, and the fused
head's fp32 accumulators.

Shared by the torch engines and the Triton engines (so it sits below both).
"""
from __future__ import annotations

import math
import mmap
import threading
import weakref
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
    :func:`workspace` maps, kept between calls.) ``huge_pages=False`` leaves the map in small pages,
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


# Workspaces kept per thread for reuse (see :func:`workspace`); the least recently used beyond this
# many are dropped (one in use stays alive with its tensors and is unmapped when they die). A fused
# head's step keeps two (weight gradient, chunk of logits); the rest is room for other callers'.
MAX_WORKSPACES = 8


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


class _Pool(threading.local):
    def __init__(self) -> None:
        self.workspaces: list[_Workspace] = []  # most recently used last


_POOL = _Pool()


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, bool]:
    """A tensor for the fused head's weight gradient or scratch, and whether it is known to be zero.

    On CPU (with anonymous maps) the memory is a map kept for the next call, as CUDA's caching
    allocator keeps its blocks: a fresh map's pages are faulted in and zeroed by the kernel on first
    touch, which, after other large allocations and frees (a training step's), costs several times
    the fused head's arithmetic. A map is reused only when no tensor made from it is alive (a
    gradient the caller still holds is never overwritten), and only for a request of between half
    and all of its size; reused contents are stale (``False``), a fresh map is zero (``True``).
    Elsewhere (GPUs, whose allocator caches already; Windows) ``torch.empty``, stale.
    :func:`release_workspaces` drops the kept maps.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0 or not USE_ANONYMOUS_MAPS:
        return torch.empty(shape, dtype=dtype, device=device), False
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    pool = _POOL.workspaces
    reusable = [w for w in pool if w.free() and nbytes <= w.nbytes <= 2 * nbytes]
    if reusable:
        found, is_zero = min(reusable, key=lambda w: w.nbytes), False
        pool.remove(found)
    else:
        found, is_zero = _Workspace(nbytes), True
        if len(pool) >= MAX_WORKSPACES:
            pool.pop(0)
    pool.append(found)
    return found.hand_out(shape, dtype, nbytes), is_zero


def release_workspaces() -> None:
    """Drop this thread's kept workspaces (their memory returns to the system once no tensor uses it)."""
    _POOL.workspaces.clear()


@dataclass
class Grads:
    """The fused head's fp32 accumulators of the three gradients (None where none is wanted).

    The weight gradient (V × H, the largest) is allocated by its first update, from :func:`zeros`.
    """

    hidden: Optional[Tensor]
    bias: Optional[Tensor]
    want_weight: bool
    shape: tuple[int, int]
    weight: Optional[Tensor] = None

    @classmethod
    def allocate(cls, positions: int, width: int, vocab_size: int, device: torch.device, want: bool,
                 need: tuple[bool, bool, bool]) -> Grads:
        """Zeroed accumulators for the gradients ``need`` asks for (hidden, weight, bias), if ``want``."""
        f32 = torch.float32
        return cls(zeros((positions, width), f32, device) if want and need[0] else None,
                   zeros((vocab_size,), f32, device) if want and need[2] else None, want and need[1],
                   (vocab_size, width))

    def weight_buffer(self, device: torch.device) -> Tensor:
        """The weight gradient, allocated (zeroed) on first use, from a reused :func:`workspace`."""
        if self.weight is None:
            self.weight, is_zero = workspace(self.shape, torch.float32, device)
            if not is_zero:
                self.weight.zero_()
        return self.weight

    def add_dense(self, idx: Tensor, z: Tensor, h: Tensor, weight: Tensor) -> None:
        """Gradients from full rows: positions ``idx`` (C,), z (C, V) fp32 = dloss/dlogits, h (C, H)."""
        g = z.to(weight.dtype)
        if self.hidden is not None:
            self.hidden.index_add_(0, idx, (g @ weight).float())
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
        """weight[index] += rows (fp32), repeated indices accumulating."""
        self.weight_buffer(rows.device).index_add_(0, index, rows)
