"""The torch engine of the fused LM head: every objective from hidden states and the head weight,
without (B, N, V) logits.

* List parts (SMILE, random subsetting, ``subset(include=)``) need only K columns of the head:
  grouped matrix products over each group's gathered head rows (``grouped.py``, shared with the
  Triton engine) — K/V of the FLOPs and memory.
* Full parts (MLE, reverse subsets, selective EOS, ``exclude``, SMILE's first token) run over
  chunks of the positions with a target: chunk logits ``h_c @ W.T`` into one reused buffer, the
  shared per-position math of ``token_math.py``, then the gradients ``G @ W`` and ``G.T @ h_c`` in the same
  loop (6·N·H·V FLOPs, no recomputation).

The head runs in the call's compute dtype (autocast's, or the widest of the inputs'); the
gradients accumulate in fp32 and come back in each input's dtype. With ``plan.stats`` the full parts
hand back each position's argmax; the positions only list parts score get one more pass of the
head over them, without gradients.

Engine contract: see ``plan.Engine`` (``inputs`` = (hidden (B, N, H), weight (V, H), bias (V,) | None)).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._buffers import Grads, GradTriple, in_compute_dtype, workspace
from .grouped import list_part
from .plan import Engine, EngineOutput, Inputs, Need, Plan
from .token_math import PositionSums, capped_argmax, full_support

# Positions per chunk of the full-vocabulary pass: about this many fp32 logits (1 << 25 = 128 MiB),
# but never fewer than MIN_CHUNK_POSITIONS positions, so that the chunk matmuls stay efficient and
# the weight gradient (V × H) is swept few times.
FUSED_CHUNK_ELEMENTS = 1 << 25
MIN_CHUNK_POSITIONS = 256


def _product(a: Tensor, b: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """``out`` (fp32) ← a @ b + bias, with no temporary when the inputs are fp32."""
    if a.dtype != torch.float32:
        return out.copy_(a @ b if bias is None else torch.addmm(bias, a, b))
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], buffer: Tensor) -> Tensor:
    """Chunk logits ``h @ weight.T + bias`` (C, V) fp32, written into ``buffer`` (no fresh tensor to fault in).

    A chunk of fewer than MIN_CHUNK_POSITIONS positions (SMILE's first tokens, a remainder) is
    computed as ``weight @ h.T`` into a (V, C) layout and returned transposed: that product streams
    the weight once, ~3× faster for a few positions. Larger chunks keep the row layout, in which
    the row math is fastest. Both gradient products take either layout as it is.
    """
    C, V = h.shape[0], weight.shape[0]
    if C < MIN_CHUNK_POSITIONS:
        col_bias = None if bias is None else bias.unsqueeze(1)
        return _product(weight, h.t(), col_bias, buffer[:V * C].view(V, C)).t()
    return _product(h, weight.t(), bias, buffer[:C * V].view(C, V))


def _full_part(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, alpha: float,
               exclude: Optional[Tensor], positions: Tensor, w_all: Optional[Tensor], sums: PositionSums,
               grads: Grads) -> None:
    """Positions whose support is every id but ``exclude``: chunked logits, loss and gradients.

    Only the listed positions are visited: a position costs 6·H·V FLOPs, gathering its hidden row
    next to nothing. One buffer holds every chunk's logits, then its gradient.
    """
    B, N, H = hidden.shape
    V = weight.shape[0]
    flat = positions.flatten().nonzero().squeeze(1)
    chunk = max(1, min(flat.numel(), max(MIN_CHUNK_POSITIONS, FUSED_CHUNK_ELEMENTS // V)))
    buffer = workspace((chunk * V,), torch.float32, hidden.device)[0]  # kept for the next call: no page faults
    h_all = hidden.reshape(B * N, H)
    for start in range(0, flat.numel(), chunk):
        idx = flat[start:start + chunk]
        b, n = idx // N, idx % N
        h = h_all[idx]                                                 # (C, H)
        z = _logits(h, weight, bias, buffer)                           # (C, V) fp32
        ex = None if exclude is None else exclude[plan.list_of(b, n)]  # (C, K)
        w = None if w_all is None else alpha * w_all[b, n].unsqueeze(1)
        terms = full_support(z, plan.labels[b, n].unsqueeze(1), ex, w, plan.softmax, predict=plan.stats)
        sums.add(idx, alpha, terms)                                    # z is now dloss/dlogits
        if w is not None:
            grads.add_dense(idx, z, h, weight)


def _predict_rest(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, sums: PositionSums) -> None:
    """The argmax of the supervised positions no full part visited: one pass of the head over them."""
    H, V = hidden.shape[-1], weight.shape[0]
    rest = sums.unpredicted(plan.target_mask)
    chunk = max(1, FUSED_CHUNK_ELEMENTS // V)
    for start in range(0, rest.numel(), chunk):
        idx = rest[start:start + chunk]
        z = torch.nn.functional.linear(hidden.reshape(-1, H)[idx], weight, bias).float()
        sums.set_predicted(idx, capped_argmax(z, plan.softmax))


def forward(inputs: Inputs, plan: Plan, need: Need, dtype: torch.dtype,
            weights: Optional[Tensor] = None) -> EngineOutput:
    """Per-position losses (B, N) and the gradients ``need`` asks for: of Σ coef·loss, or of
    Σ weights·loss when ``weights`` (B, N) are given (backward's recompute)."""
    hidden, weight, bias = in_compute_dtype(inputs, dtype)
    assert weight is not None
    B, N, H = hidden.shape
    V = weight.shape[0]
    w_all = weights if weights is not None else plan.coef if any(need) else None
    grads = Grads.allocate(B * N, H, V, hidden.device, w_all is not None, need)
    sums = PositionSums(B * N, hidden.device, plan.stats)
    for part in plan.parts:
        if part.ids is None:
            _full_part(hidden, weight, bias, plan, part.alpha, part.exclude, part.positions, w_all, sums, grads)
        else:
            list_part(hidden, weight, bias, plan, part, w_all, sums, grads)
    if grads.want_weight:  # allocated here when nothing was supervised
        grads.weight_buffer(hidden.device)
    if plan.stats:
        _predict_rest(hidden, weight, bias, plan, sums)
    return EngineOutput(sums.loss.view(B, N), grads.results(inputs),
                        None if sums.z_part is None else sums.z_part.view(B, N),
                        None if sums.predicted is None else sums.predicted.view(B, N))


def backward(inputs: Inputs, plan: Plan, weights: Tensor, need: Need, dtype: torch.dtype) -> GradTriple:
    """The gradients of Σ weights·loss, recomputed (per-position outputs learn their weights only here)."""
    return forward(inputs, plan, need, dtype, weights).grads


def engine() -> Engine:
    """This engine: scalar outputs get their gradients in forward, per-position ones recompute."""
    return Engine(forward, backward, rowwise=False)
