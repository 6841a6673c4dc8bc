"""The Triton engines: the contract of ``plan.Engine``, as the torch engines of ``torch_logits.py``
and ``torch_linear.py``.

The logits path writes the (B, N, V) gradient of Σ coef·loss once (the first full part stores every
row, later parts add). The fused head accumulates the gradients of Σ w·loss for hidden, weight and
bias (in the compute dtype, or fp32 with ``plan.exact``); its full parts' logits exist only as tiles
(a statistics pass, then a gradient pass that recomputes its tiles, as Cut Cross-Entropy does), its
list parts are grouped matrix products over each group's gathered head rows (``grouped.py``). With ``plan.stats`` the statistics pass of full parts also finds
each position's argmax; positions that only list parts score get one statistics pass over the
vocabulary for it, without gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, TypeVar

import torch
import triton
from torch import Tensor
from triton.runtime.errors import OutOfResources

from .._buffers import Grads, GradTriple, in_compute_dtype
from ..grouped import list_part
from ..plan import Engine, EngineOutput, Inputs, Need, Plan
from ..token_math import PositionSums
from . import support_ce as kern
from .candidates import candidate_rows
from .finish import finish
from .parts import Blocks, Part, accumulator_dtype, blocks_for, full_part, interpreting, parts_of, slot_values

T = TypeVar("T")


@dataclass
class Source:
    """Where tile logits come from: logits rows ``x`` (B·N, V), or hidden rows ``x`` (B·N, H) times
    the head ``weight`` (V, H) plus ``bias``."""

    x: Tensor
    vocab_size: int
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    cap: float = 0.0  # c > 0: tile logits are capped to c·tanh(z / c) in the kernels

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
        return dict(FUSED=self.fused, HAS_BIAS=self.bias is not None, SOFTCAP=self.cap > 0,
                    UPCAST=interpreting(), PRECISION="ieee" if dtype == torch.float32 else "tf32")

    def pointers(self) -> tuple[Tensor, Tensor, Tensor, int, int]:
        w = self.x if self.weight is None else self.weight
        b = self.bias if self.bias is not None else self.x
        H = self.x.shape[1] if self.fused else 0
        return self.x, w, b, H, w.stride(0)


def _layout(part: Part, src: Source) -> tuple[int, int, int, Tensor, Tensor, Tensor]:
    """G, M, C and the (possibly placeholder) tensors for the cols, brows and bitmap arguments."""
    slots = part.slot_positions
    G, M = slots.shape
    C = src.vocab_size if part.cols is None else part.cols.shape[1]
    cols = slots if part.cols is None else part.cols
    brows = slots if part.brows is None else part.brows
    bitmap = slots if part.bitmap is None else part.bitmap
    return G, M, C, cols, brows, bitmap


class Statistics(NamedTuple):
    """A part's statistics: per split and slot (4, S, P) the running max, Σ exp(z - max), Σ z and the
    support's size (``finish.py`` merges them); per slot the label's logit (P,) and with ``argmax``
    the id of the largest logit over all V ids."""

    split: Tensor
    z_y: Tensor
    predicted: Optional[Tensor] = None


def fitted(launch: Callable[[Blocks], T], blocks: Blocks) -> T:
    """``launch(blocks)``, or where its kernel needs more shared memory than the GPU has (Triton's
    ``OutOfResources``, raised before the kernel runs) ``launch`` with ``blocks.fallback``."""
    try:
        return launch(blocks)
    except OutOfResources:
        if blocks.fallback is None:
            raise
        return fitted(launch, blocks.fallback)


def statistics(src: Source, part: Part, blocks: Blocks, labels: Tensor, argmax: bool = False) -> Statistics:
    """One statistics pass over a part's slots (``argmax`` for full parts only)."""
    return fitted(lambda b: _statistics(src, part, b, labels, argmax), blocks)


def _statistics(src: Source, part: Part, blocks: Blocks, labels: Tensor, argmax: bool) -> Statistics:
    G, M, C, cols, brows, bitmap = _layout(part, src)
    P = G * M
    per_split = triton.cdiv(triton.cdiv(C, blocks.c), blocks.splits)
    splits = triton.cdiv(triton.cdiv(C, blocks.c), per_split)
    # One allocation: per split and slot max, Σ exp, Σ z, size; then the label logits.
    scratch = torch.empty((4 * splits + 1) * P, dtype=torch.float32, device=src.x.device)
    out, z_y = scratch[:4 * splits * P].view(4, splits, P), scratch[4 * splits * P:]
    best = torch.empty(splits, P, dtype=torch.float32, device=src.x.device) if argmax else z_y
    arg = torch.empty(splits, P, dtype=torch.int32, device=src.x.device) if argmax else z_y
    x, w, b, H, stride_w = src.pointers()
    kern._stats_kernel[(G * triton.cdiv(M, blocks.m), splits)](
        x, w, b, part.slot_positions, labels, brows, cols, bitmap, out[0], out[1], out[2], out[3], z_y, best, arg,
        M, C, src.vocab_size, H, P, x.stride(0), stride_w, per_split, src.cap or 1.0,
        LIST=part.cols is not None, EXCLUDE=part.bitmap is not None, **src.flags(), ARGMAX=argmax,
        BLOCK_M=blocks.m, BLOCK_C=blocks.c, BLOCK_H=blocks.h, **blocks.launch())
    predicted = arg.gather(0, best.argmax(0, keepdim=True)).squeeze(0).long() if argmax else None
    return Statistics(out, z_y, predicted)


def gradients(src: Source, part: Part, blocks: Blocks, labels: Tensor, coef: Tensor, lse: Tensor, size: Tensor,
              z_y: Tensor, pscale: Tensor, eps: float, gx: Optional[Tensor], gw: Optional[Tensor],
              gb: Optional[Tensor], store: bool, store_w: bool = False) -> None:
    """Add (or, with ``store``, write) the gradient of Σ coef·loss over a part's slots into the
    logits' gradient ``gx`` (logits path) or into the hidden/weight/bias gradients (fused; with
    ``store_w`` the weight gradient is written, see ``single_block``); ``pscale`` (P,) multiplies
    each slot's softmax term (the z-loss)."""
    G, M, C, cols, brows, bitmap = _layout(part, src)
    x, w, b, H, stride_w = src.pointers()
    spare = coef  # stands in for a gradient that is not wanted (never written: its flag is off)
    gx_, gw_, gb_ = (spare if t is None else t for t in (gx, gw, gb))
    wanted = dict(GRAD_X=gx is not None, GRAD_W=gw is not None, GRAD_B=gb is not None,
                  RMW=interpreting() and any(t is not None and t.dtype != torch.float32 for t in (gx, gw)))

    def launch(tile: Blocks) -> Blocks:
        kern._grad_kernel[(G * triton.cdiv(M, tile.m), triton.cdiv(C, tile.c))](
            x, w, b, part.slot_positions, labels, brows, cols, bitmap, coef, lse, size, pscale, eps, gx_, gw_, gb_,
            M, C, src.vocab_size, H, x.stride(0), stride_w, gx_.stride(0), gw_.stride(0), src.cap or 1.0,
            LIST=part.cols is not None, EXCLUDE=part.bitmap is not None, **src.flags(), STORE=store, **wanted,
            FILTER=src.filter, BLOCK_M=tile.m, BLOCK_C=tile.c, BLOCK_H=tile.h, STORE_W=store_w, **tile.launch())
        return tile
    blocks = fitted(launch, blocks)
    P = G * M
    # Slots of a block may share a label, i.e. a weight-gradient row: a load-add-store (RMW) block
    # would keep one of their additions, so under RMW each program takes one slot.
    m = 1 if wanted["RMW"] else blocks.m
    kern._label_grad_kernel[(triton.cdiv(P, m),)](
        x, w, part.slot_positions, labels, coef, lse, size, z_y, pscale, eps, gx_, gw_, gb_,
        P, H, x.stride(0), stride_w, gx_.stride(0), gw_.stride(0), src.cap or 1.0,
        FUSED=src.fused, SOFTCAP=src.cap > 0, **wanted, BLOCK_M=m, BLOCK_H=blocks.h)


def single_block(part: Part, blocks: Blocks) -> bool:
    """Whether one block of slots holds the whole full part, with ``blocks`` and its fallbacks: then
    each program of the gradient pass is alone on its columns, and can write the weight gradient's
    rows (SMILE's first tokens: a few positions against every id)."""
    G, M = part.slot_positions.shape
    tile: Optional[Blocks] = blocks
    while tile is not None:
        if G != 1 or M > tile.m:
            return False
        tile = tile.fallback
    return part.cols is None


def _run_parts(src: Source, plan: Plan, parts: list[tuple[float, Part]], weights: Optional[Tensor],
               sums: PositionSums, gx: Optional[Tensor], gw: Optional[Tensor] = None,
               gb: Optional[Tensor] = None, stale: bool = False) -> bool:
    """Every part: losses, and gradients weighted by ``weights`` (B, N) when given. Only a first
    part that covers every position stores; the others add. ``stale``: ``gw`` holds stale values —
    a first part in a single block writes it, else it is zeroed first; returns whether it is still
    stale (no gradient pass ran). With ``plan.stats``, the supervised positions no full part scored
    get their argmax from one more statistics pass."""
    labels = plan.labels.reshape(-1).contiguous()
    # The large Hopper tile where it was measured: low-precision inputs accumulated in their own dtype.
    large = src.x.dtype != torch.float32 and all(t is None or t.dtype == src.x.dtype for t in (gx, gw))
    for i, (alpha, part) in enumerate(parts):
        if part.slot_positions.numel() == 0:
            continue
        C = src.vocab_size if part.cols is None else part.cols.shape[1]
        blocks = blocks_for(part, C, src.fused, src.x.device, large)
        stats = statistics(src, part, blocks, labels, argmax=plan.stats and part.cols is None)
        slot = finish(stats.split, stats.z_y, part, alpha, plan.softmax, sums.loss, sums.z_part, weights)
        if stats.predicted is not None:  # statistics only: a selection waits for the GPU
            on = slot_values(part, part.positions)
            sums.set_predicted(part.slots[on], stats.predicted[on])
        if slot is not None:
            store_w = stale and single_block(part, blocks)
            if stale and not store_w and gw is not None:
                gw.zero_()
            stale = False
            gradients(src, part, blocks, labels, slot.coef, slot.lse, slot.size, stats.z_y, slot.pscale, slot.eps, gx, gw,
                      gb, store=i == 0 and part.covers_all, store_w=store_w)
    rest = sums.unpredicted(plan.target_mask) if plan.stats else None
    if rest is not None and rest.numel():
        positions = torch.zeros_like(plan.target_mask).view(-1).index_fill_(0, rest, True)
        part = full_part(None, positions.view_as(plan.target_mask), src.vocab_size, cover_all=False)
        stats = statistics(src, part, blocks_for(part, src.vocab_size, src.fused, src.x.device), labels, argmax=True)
        assert stats.predicted is not None
        sums.set_predicted(part.slots, stats.predicted)
    return stale


def logits_forward(inputs: Inputs, plan: Plan, need: Need, dtype: torch.dtype) -> EngineOutput:
    """Per-position losses (B, N) fp32 and, if ``need`` asks, the gradient of Σ coef·loss w.r.t. the logits."""
    logits = inputs[0]
    B, N, V = logits.shape
    x = logits.reshape(B * N, V)
    if x.stride(1) != 1:
        x = x.contiguous()
    sums = PositionSums(B * N, x.device, plan.stats)
    parts = list(parts_of(plan, V, cover_first=need[0]))
    grad = None
    if need[0]:  # a first part covering every position writes every row: no zeroing needed
        grad = torch.empty_like(x) if parts and parts[0][1].covers_all else torch.zeros_like(x)
    _run_parts(Source(x, V, cap=plan.softmax.softcap), plan, parts, plan.coef if need[0] else None,
               sums, gx=grad)
    return _output(sums, (B, N), (None if grad is None else grad.view(B, N, V), None, None))


def linear_forward(inputs: Inputs, plan: Plan, need: Need, dtype: torch.dtype,
                   weights: Optional[Tensor] = None) -> EngineOutput:
    """Per-position losses (B, N) and the gradients ``need`` asks for: of Σ coef·loss, or of
    Σ weights·loss when ``weights`` (B, N) are given (backward's recompute).

    Full parts run on the kernels; list parts as grouped matrix products (``grouped.py``). The
    hidden and weight gradients accumulate in the compute dtype where the GPU has its atomics
    (bf16/fp16: no fp32 buffer of the head's size, each tile's sum rounded as it is added, as Cut
    Cross-Entropy's default), else — and with ``plan.exact`` — in fp32, rounded once at the end."""
    hidden, weight, bias = in_compute_dtype(inputs, dtype)
    assert weight is not None
    B, N, H = hidden.shape
    V = weight.shape[0]
    w_all = weights if weights is not None else plan.coef if any(need) else None
    accumulate = accumulator_dtype(dtype, hidden.device, plan.exact)
    grads = Grads.allocate(B * N, H, V, hidden.device, w_all is not None, need, accumulate)
    # The weight gradient: written by a first full part in a single block (no zeroing), else zeroed.
    stale = grads.want_weight and not grads.weight_buffer(hidden.device, zero=False)
    src = Source(hidden.reshape(B * N, H).contiguous(), V, weight.contiguous(),
                 None if bias is None else bias.contiguous(), plan.softmax.softcap)
    sums = PositionSums(B * N, hidden.device, plan.stats)
    # Full parts first: finding their positions waits for the GPU, best before the list parts' products are queued.
    full = [(p.alpha, full_part(p.exclude, p.positions, V, False, plan.sequence)) for p in plan.parts if p.ids is None]
    if _run_parts(src, plan, full, w_all, sums, gx=grads.hidden, gw=grads.weight, gb=grads.bias, stale=stale):
        grads.zero_weight()
    for p in plan.parts:
        if p.ids is not None:
            list_part(hidden, weight, bias, plan, p, w_all, sums, grads, candidate_rows)
    return _output(sums, (B, N), grads.results(inputs))


def linear_backward(inputs: Inputs, plan: Plan, weights: Tensor, need: Need, dtype: torch.dtype) -> GradTriple:
    """The gradients of Σ weights·loss, recomputed (per-position outputs learn their weights only here)."""
    return linear_forward(inputs, plan, need, dtype, weights).grads


def _output(sums: PositionSums, shape: tuple[int, int], grads: GradTriple) -> EngineOutput:
    return EngineOutput(sums.loss.view(shape), grads, None if sums.z_part is None else sums.z_part.view(shape),
                        None if sums.predicted is None else sums.predicted.view(shape))


def logits_engine() -> Engine:
    return Engine(logits_forward, None, rowwise=True)


def linear_engine() -> Engine:
    return Engine(linear_forward, linear_backward, rowwise=False)
