"""The Triton engines: the same contracts as the torch engines of ``torch_logits.py`` and ``torch_linear.py``.

``logits_forward(logits, plan, need_grad)`` → per-position losses and the (B, N, V) gradient of
Σ coef·loss, written once (the first full part stores every row, later parts add).
``linear_forward(hidden, weight, bias, plan, w_all, need)`` → per-position losses and, given
``w_all``, fp32 gradients of Σ w·loss for hidden, weight and bias; the logits exist only as tiles
(statistics pass, then a gradient pass that recomputes its tiles, as Cut Cross-Entropy does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
from torch import Tensor

from .._buffers import Grads
from ..plan import Plan
from . import support_ce as kern
from .parts import Blocks, Part, blocks_for, combine, interpreting, parts_of, slot_values


@dataclass
class Source:
    """Where tile logits come from: logits rows ``x`` (B·N, V), or hidden rows ``x`` (B·N, H) times
    the head ``weight`` (V, H) plus ``bias``."""

    x: Tensor
    vocab_size: int
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    softcap: Optional[float] = None  # tile logits are capped in the kernels

    @property
    def cap(self) -> float:
        return 1.0 if self.softcap is None else float(self.softcap)

    @property
    def fused(self) -> bool:
        return self.weight is not None

    @property
    def filter(self) -> float:
        """Cut Cross-Entropy's gradient filter: fused tiles whose every |softmax - ε/|S|| is below
        2^-12 are skipped for bf16/fp16 inputs (their contributions are below what those dtypes
        resolve next to the label's term); fp32 is exact."""
        return 2.0 ** -12 if self.fused and self.x.dtype in (torch.bfloat16, torch.float16) else 0.0

    def flags(self) -> dict:
        dtype = self.x.dtype
        return dict(FUSED=self.fused, HAS_BIAS=self.bias is not None, SOFTCAP=self.softcap is not None,
                    UPCAST=interpreting(), PRECISION="ieee" if dtype == torch.float32 else "tf32")

    def pointers(self) -> tuple[Tensor, Tensor, Tensor, int, int]:
        w = self.x if self.weight is None else self.weight
        b = self.bias if self.bias is not None else self.x
        H = self.x.shape[1] if self.fused else 0
        return self.x, w, b, H, w.stride(0)


def _layout(part: Part, src: Source) -> tuple[int, int, int, Tensor, Tensor, Tensor]:
    """G, M, C and the (possibly placeholder) tensors for the cols, brows and bitmap arguments."""
    G, M = part.rows.shape
    C = src.vocab_size if part.cols is None else part.cols.shape[1]
    cols = part.rows if part.cols is None else part.cols
    brows = part.rows if part.brows is None else part.brows
    bitmap = part.rows if part.bitmap is None else part.bitmap
    return G, M, C, cols, brows, bitmap


def statistics(src: Source, part: Part, blocks: Blocks, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """lse, Σ z, support size and label logit of every slot of a part (each (P,) fp32)."""
    G, M, C, cols, brows, bitmap = _layout(part, src)
    P = G * M
    per_split = triton.cdiv(triton.cdiv(C, blocks.c), blocks.splits)
    splits = triton.cdiv(triton.cdiv(C, blocks.c), per_split)
    out = torch.empty(4, splits, P, dtype=torch.float32, device=src.x.device)
    z_y = torch.empty(P, dtype=torch.float32, device=src.x.device)
    x, w, b, H, stride_w = src.pointers()
    kern._stats_kernel[(G * triton.cdiv(M, blocks.m), splits)](
        x, w, b, part.rows, labels, brows, cols, bitmap, out[0], out[1], out[2], out[3], z_y,
        M, C, src.vocab_size, H, P, x.stride(0), stride_w, per_split, src.cap,
        LIST=part.cols is not None, EXCLUDE=part.bitmap is not None, **src.flags(),
        BLOCK_M=blocks.m, BLOCK_C=blocks.c, BLOCK_H=blocks.h)
    lse, zsum, size = combine(out)
    return lse, zsum, size, z_y


def gradients(src: Source, part: Part, blocks: Blocks, labels: Tensor, coef: Tensor, lse: Tensor, size: Tensor,
              z_y: Tensor, pscale: Tensor, eps: float, gx: Optional[Tensor], gw: Optional[Tensor],
              gb: Optional[Tensor], store: bool) -> None:
    """Add (or, with ``store``, write) the gradient of Σ coef·loss over a part's slots into the
    logits' gradient ``gx`` (logits path) or into the hidden/weight/bias gradients (fused);
    ``pscale`` (P,) multiplies each slot's softmax term (the z-loss)."""
    G, M, C, cols, brows, bitmap = _layout(part, src)
    x, w, b, H, stride_w = src.pointers()
    spare = coef  # stands in for a gradient that is not wanted (never written: its flag is off)
    gx_, gw_, gb_ = (spare if t is None else t for t in (gx, gw, gb))
    wanted = dict(GRAD_X=gx is not None, GRAD_W=gw is not None, GRAD_B=gb is not None)
    kern._grad_kernel[(G * triton.cdiv(M, blocks.m), triton.cdiv(C, blocks.c))](
        x, w, b, part.rows, labels, brows, cols, bitmap, coef, lse, size, pscale, eps, gx_, gw_, gb_,
        M, C, src.vocab_size, H, x.stride(0), stride_w, gx_.stride(0), gw_.stride(0), src.cap,
        LIST=part.cols is not None, EXCLUDE=part.bitmap is not None, **src.flags(), STORE=store, **wanted,
        FILTER=src.filter,
        BLOCK_M=blocks.m, BLOCK_C=blocks.c, BLOCK_H=blocks.h)
    P = G * M
    kern._label_grad_kernel[(triton.cdiv(P, blocks.m),)](
        x, w, part.rows, labels, coef, lse, size, z_y, pscale, eps, gx_, gw_, gb_,
        P, H, x.stride(0), stride_w, gx_.stride(0), gw_.stride(0), src.cap,
        FUSED=src.fused, SOFTCAP=src.softcap is not None, **wanted, BLOCK_M=blocks.m, BLOCK_H=blocks.h)


def _add_losses(loss: Tensor, part: Part, alpha: float, eps: float, z_loss: float,
                lse: Tensor, zsum: Tensor, size: Tensor, z_y: Tensor) -> None:
    """loss (B·N,) += alpha · (lse - (1-ε)·z_y - ε·mean z + ζ·lse²) at the part's scored slots."""
    tok = lse - z_y if not eps else lse - (1 - eps) * z_y - eps * zsum / size
    if z_loss:
        tok = tok + z_loss * lse * lse
    on = slot_values(part, part.positions)
    loss.index_add_(0, part.slots[on], alpha * tok[on])


def _run_parts(src: Source, plan: Plan, parts: list[tuple[float, Part]], weights: Optional[Tensor], loss: Tensor,
               gx: Optional[Tensor], gw: Optional[Tensor] = None, gb: Optional[Tensor] = None) -> None:
    """Every part: losses, and gradients weighted by ``weights`` (B, N) when given. Only a first
    part that covers every position stores; the others add."""
    labels = plan.labels.reshape(-1).contiguous()
    eps = plan.label_smoothing
    for i, (alpha, part) in enumerate(parts):
        if part.rows.numel() == 0:
            continue
        C = src.vocab_size if part.cols is None else part.cols.shape[1]
        blocks = blocks_for(part, C, src.fused, src.x.device)
        lse, zsum, size, z_y = statistics(src, part, blocks, labels)
        _add_losses(loss, part, alpha, eps, plan.z_loss, lse, zsum, size, z_y)
        if weights is not None:
            coef = alpha * slot_values(part, weights * part.positions).float().contiguous()
            pscale = (1 + 2 * plan.z_loss * lse).contiguous()  # d(ζ·lse²)/dz = 2ζ·lse·p
            gradients(src, part, blocks, labels, coef, lse, size, z_y, pscale, eps, gx, gw, gb,
                      store=i == 0 and part.covers_all)


def logits_forward(logits: Tensor, plan: Plan, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Per-position losses (B, N) fp32 and, if asked, the gradient of Σ coef·loss w.r.t. the logits."""
    B, N, V = logits.shape
    x = logits.reshape(B * N, V)
    if x.stride(1) != 1:
        x = x.contiguous()
    loss = torch.zeros(B * N, dtype=torch.float32, device=x.device)
    parts = list(parts_of(plan, V, cover_first=need_grad))
    grad = None
    if need_grad:  # a first part covering every position writes every row: no zeroing needed
        grad = torch.empty_like(x) if parts and parts[0][1].covers_all else torch.zeros_like(x)
    _run_parts(Source(x, V, softcap=plan.softcap), plan, parts, plan.coef if need_grad else None, loss, gx=grad)
    return loss.view(B, N), (grad.view(B, N, V) if grad is not None else None)


def linear_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, w_all: Optional[Tensor],
                   need: tuple[bool, bool, bool]) -> tuple[Tensor, Grads]:
    """Per-position losses (B, N) and, when ``w_all`` (B, N) is given, fp32 gradients of Σ w·loss."""
    B, N, H = hidden.shape
    V = weight.shape[0]
    grads = Grads.allocate(B * N, H, V, hidden.device, w_all is not None, need)
    if grads.want_weight:  # the kernels add into it from the start
        grads.weight_buffer(hidden.device)
    src = Source(hidden.reshape(B * N, H).contiguous(), V, weight.contiguous(),
                 None if bias is None else bias.contiguous(), plan.softcap)
    loss = torch.zeros(B * N, dtype=torch.float32, device=hidden.device)
    _run_parts(src, plan, list(parts_of(plan, V, cover_first=False)), w_all, loss,
               gx=grads.hidden, gw=grads.weight, gb=grads.bias)
    return loss.view(B, N), grads
