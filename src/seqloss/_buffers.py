"""Gradient buffers: zero tensors that are cheap to fault in, and the fused head's fp32 accumulators.

Shared by the torch engines and the Triton engines (so it sits below both).
"""
from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


def anonymous_maps() -> bool:
    """Whether this platform can give anonymous private memory maps (POSIX: yes; Windows: no)."""
    return hasattr(mmap, "MAP_ANONYMOUS") and hasattr(mmap, "MAP_PRIVATE")


# Read at every call, so a test can force the fallback.
USE_ANONYMOUS_MAPS = anonymous_maps()


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero tensor for a gradient buffer.

    On CPU, where the platform has anonymous maps, it is such a map advised for transparent huge
    pages where the kernel offers them: the kernel hands out pages already zeroed (no memset pass),
    and with huge pages a 128 MiB buffer takes ~64 page faults instead of ~32,000 — which, for the
    sparse gradients of list supports and for the fused head's (V, H) weight gradient, is most of
    the cost. Elsewhere (GPUs, Windows, empty shapes), ``torch.zeros``.
    """
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0 or not USE_ANONYMOUS_MAPS:
        return torch.zeros(shape, dtype=dtype, device=device)
    region = mmap.mmap(-1, numel * torch.empty((), dtype=dtype).element_size(),
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)  # keeps the map alive


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
        """The weight gradient, allocated (zeroed) on first use."""
        if self.weight is None:
            self.weight = zeros(self.shape, torch.float32, device)
        return self.weight

    def add_dense(self, idx: Tensor, z: Tensor, h: Tensor, weight: Tensor) -> None:
        """Gradients from full rows: positions ``idx`` (C,), z (C, V) fp32 = dloss/dlogits, h (C, H)."""
        g = z.to(weight.dtype)
        if self.hidden is not None:
            self.hidden.index_add_(0, idx, (g @ weight).float())
        if self.want_weight:
            if g.dtype == torch.float32:
                self.weight_buffer(g.device).addmm_(g.t(), h)
            else:
                self.weight_buffer(g.device).add_((g.t() @ h).float())
        if self.bias is not None:
            self.bias.add_(z.sum(0))

    def add_weight_rows(self, index: Tensor, rows: Tensor) -> None:
        """weight[index] += rows (fp32), repeated indices accumulating."""
        self.weight_buffer(rows.device).index_add_(0, index, rows)
