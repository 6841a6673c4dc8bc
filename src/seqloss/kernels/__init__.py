"""Optional Triton kernels behind ``impl="triton"``, imported only when that impl runs.

They run on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
set before the first Triton kernel is defined), which is how the test suite checks them.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from ..plan import Engine


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the kernels cannot run on ``device`` here, or None when they can."""
    # Dynamo (torch 2.11) refuses to trace find_spec; traced, a missing Triton still fails loudly
    # (ImportError) when the op runs.
    if not torch.compiler.is_compiling() and importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'seqloss[triton]')"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return (f"the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
            f"and these are on {device.type!r}")


def logits_engine() -> Engine:
    """The Triton engine of the logits path (imports Triton)."""
    from .engine import logits_engine as load
    return load()


def linear_engine() -> Engine:
    """The Triton engine of the fused head (imports Triton)."""
    from .engine import linear_engine as load
    return load()
