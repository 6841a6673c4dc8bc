"""The fused LM head: every objective from hidden states and the head weight, without (B, N, V) logits.

``linear_loss(hidden, weight, labels)`` equals ``objective_loss(hidden @ weight.T + bias, labels)``.

* List supports (SMILE, random subsetting, ``subset(include=)``) need only K columns of the head:
  the rows ``weight[ids]`` are gathered per group of positions sharing a list (a row of the batch,
  or a single position) and multiplied in a batched matmul — K/V of the FLOPs and memory. The
  weight gradient is scattered back with ``index_add_``.
* Full supports (MLE, reverse subsets, selective EOS, ``exclude``, SMILE's first token) run over
  chunks of the positions with a target: chunk logits ``h_c @ W.T`` into one reused buffer, the
  shared per-row math of ``rows.py``, then the gradients ``G @ W`` and ``G.T @ h_c`` in the same
  loop (6·N·H·V FLOPs, no recomputation).

With ``reduction="mean"`` or ``"sum"`` the gradients are computed in the forward pass and backward
only scales them. With ``"none"``/``"sequence"`` the per-position weights are known only in
backward, so backward recomputes (8·N·H·V FLOPs). Weight and bias gradients accumulate in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import kernels
from ._validate import COMMON_DEFAULTS, check_common, check_labels, check_linear, check_objective, route_options
from .losses import Plan, finish, plan_of, reference_loss, resolve_impl, support_parts, targets_of, zeros
from .rows import candidates, full_rows, list_rows

# Positions per chunk of the full-vocabulary pass: about this many fp32 logits (128 MiB), but never
# fewer than MIN_CHUNK_POSITIONS positions, so that the chunk matmuls stay efficient and the weight
# gradient (V × H) is swept few times.
FUSED_CHUNK_ELEMENTS = 1 << 25
MIN_CHUNK_POSITIONS = 256
# Gathered head rows per block of the list pass (groups × K × H elements).
LIST_BLOCK_ELEMENTS = 1 << 24


@dataclass
class _Grads:
    """fp32 accumulators of the three gradients (None where no gradient is wanted).

    The weight gradient (V × H, the largest) is allocated by its first update, from ``zeros``
    (huge pages, already zeroed by the kernel).
    """

    hidden: Optional[Tensor]
    bias: Optional[Tensor]
    want_weight: bool
    shape: Tuple[int, int]
    weight: Optional[Tensor] = None

    def add_dense(self, idx: Tensor, z: Tensor, h: Tensor, weight: Tensor) -> None:
        """Gradients from full rows: positions ``idx`` (C,), z (C, V) fp32 = dloss/dlogits, h (C, H)."""
        g = z.to(weight.dtype)
        if self.hidden is not None:
            self.hidden.index_add_(0, idx, (g @ weight).float())
        if self.want_weight:
            if self.weight is None:
                self.weight = zeros(self.shape, torch.float32, g.device)
            if g.dtype == torch.float32:
                self.weight.addmm_(g.t(), h)
            else:
                self.weight.add_((g.t() @ h).float())
        if self.bias is not None:
            self.bias.add_(z.sum(0))

    @classmethod
    def allocate(cls, positions: int, width: int, vocab_size: int, device: torch.device, want: bool,
                 need: Tuple[bool, bool, bool]) -> "_Grads":
        """Zeroed accumulators for the gradients ``need`` asks for (hidden, weight, bias), if ``want``."""
        f32 = dict(dtype=torch.float32, device=device)
        return cls(zeros((positions, width), **f32) if want and need[0] else None,
                   zeros((vocab_size,), **f32) if want and need[2] else None, want and need[1], (vocab_size, width))

    def add_weight_rows(self, index: Tensor, rows: Tensor) -> None:
        """weight[index] += rows (fp32), repeated indices accumulating."""
        if self.weight is None:
            self.weight = zeros(self.shape, torch.float32, rows.device)
        self.weight.index_add_(0, index, rows)


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
               exclude: Optional[Tensor], positions: Tensor, w_all: Optional[Tensor], loss: Tensor,
               grads: _Grads) -> None:
    """Positions whose support is every id but ``exclude``: chunked logits, loss and gradients.

    Only the listed positions are visited: a position costs 6·H·V FLOPs, gathering its hidden row
    next to nothing. One buffer holds every chunk's logits, then its gradient.
    """
    B, N, H = hidden.shape
    V = weight.shape[0]
    flat = positions.flatten().nonzero().squeeze(1)
    chunk = max(1, min(flat.numel(), max(MIN_CHUNK_POSITIONS, FUSED_CHUNK_ELEMENTS // V)))
    buffer = torch.empty(chunk * V, dtype=torch.float32, device=hidden.device)
    h_all = hidden.reshape(B * N, H)
    for start in range(0, flat.numel(), chunk):
        idx = flat[start:start + chunk]
        b, n = idx // N, idx % N
        h = h_all[idx]                                                 # (C, H)
        z = _logits(h, weight, bias, buffer)                           # (C, V) fp32
        y = plan.labels[b, n].unsqueeze(1)
        ex = None if exclude is None else exclude[b, n if exclude.shape[1] > 1 else 0]
        w = None if w_all is None else alpha * w_all[b, n].unsqueeze(1)
        tok = full_rows(z, y, ex, plan.label_smoothing, w)             # z becomes dloss/dlogits
        loss.view(-1).index_add_(0, idx, alpha * tok.squeeze(1))
        if w is not None:
            grads.add_dense(idx, z, h, weight)


def _groups(ids: Tensor, hidden: Tensor, plan: Plan, positions: Tensor, w_all: Optional[Tensor]):
    """Positions grouped by the list they share: rows of the batch for (B, 1, K) lists, single
    positions for (B, N, K) lists → ids (G, K), hidden (G, M, H), labels (G, M, 1), positions
    and weights (G, M), flat position index (G, M)."""
    B, N, H = hidden.shape
    index = torch.arange(B * N, device=hidden.device).reshape(B, N)
    if ids.shape[1] == 1:
        parts = (ids[:, 0], hidden, plan.labels.unsqueeze(-1), positions, w_all, index)
    else:
        parts = (ids.reshape(B * N, ids.shape[-1]), hidden.reshape(B * N, 1, H), plan.labels.reshape(B * N, 1, 1),
                 positions.reshape(B * N, 1), None if w_all is None else w_all.reshape(B * N, 1),
                 index.reshape(B * N, 1))
    return parts


def _list_part(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, alpha: float, ids: Tensor,
               positions: Tensor, w_all: Optional[Tensor], loss: Tensor, grads: _Grads) -> None:
    """Positions whose support is the label plus ``ids``: gathered head rows, batched matmuls."""
    H = hidden.shape[-1]
    ids_g, h_g, y_g, pos_g, w_g, index_g = _groups(ids, hidden, plan, positions, w_all)
    G, K = ids_g.shape
    M = h_g.shape[1]
    block = max(1, LIST_BLOCK_ELEMENTS // max(1, (K + M) * H))
    for s in range(0, G, block):
        sl = slice(s, s + block)
        h, y, on, flat = h_g[sl].float(), y_g[sl], pos_g[sl], index_g[sl]  # (g, M, H), (g, M, 1), (g, M)
        cand, valid = candidates(ids_g[sl].unsqueeze(1).expand(-1, M, -1), y, on)  # (g, M, K+1)
        # The list part is small (K columns), so its math is fp32 throughout: bf16 inputs round once.
        w_rows = weight[ids_g[sl].clamp(min=0)].float()                # (g, K, H)
        w_y = weight[y.squeeze(-1)].float()                             # (g, M, H)
        z = torch.cat([torch.bmm(h, w_rows.transpose(1, 2)), (h * w_y).sum(-1, keepdim=True)], dim=-1)
        if bias is not None:
            z = z + bias[cand].float()
        w = None if w_g is None else alpha * w_g[sl].unsqueeze(-1)
        tok, g = list_rows(z, valid, plan.label_smoothing, w)            # (g, M, 1), (g, M, K+1)
        loss.view(-1).index_add_(0, flat.flatten(), alpha * tok.flatten())
        if g is None:
            continue
        g_list, g_y = g[..., :K], g[..., K:]
        if grads.hidden is not None:
            dh = torch.baddbmm(g_y * w_y, g_list, w_rows)               # (g, M, H)
            grads.hidden.index_add_(0, flat.flatten(), dh.reshape(-1, H))
        if grads.want_weight:
            dw_rows = torch.bmm(g_list.transpose(1, 2), h)              # (g, K, H)
            grads.add_weight_rows(ids_g[sl].clamp(min=0).flatten(), dw_rows.reshape(-1, H))
            grads.add_weight_rows(y.flatten(), (g_y * h).reshape(-1, H))
        if grads.bias is not None:
            grads.bias.index_add_(0, cand.flatten(), g.flatten())


def linear_engine(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, w_all: Optional[Tensor],
                  need: Tuple[bool, bool, bool]) -> Tuple[Tensor, _Grads]:
    """Per-position losses (B, N) and, when ``w_all`` (B, N) is given, the gradients of Σ w·loss."""
    B, N, H = hidden.shape
    V = weight.shape[0]
    grads = _Grads.allocate(B * N, H, V, hidden.device, w_all is not None, need)
    loss = torch.zeros(B, N, dtype=torch.float32, device=hidden.device)
    for part in support_parts(plan):
        if part.ids is None:
            _full_part(hidden, weight, bias, plan, part.alpha, part.exclude, part.positions, w_all, loss, grads)
        else:
            _list_part(hidden, weight, bias, plan, part.alpha, part.ids, part.positions, w_all, loss, grads)
    if grads.want_weight and grads.weight is None:  # nothing supervised
        grads.weight = zeros((V, H), torch.float32, hidden.device)
    return loss, grads


class LinearSupportCrossEntropy(torch.autograd.Function):
    """Fused head + support cross-entropy. Scalar outputs: gradients made in forward; per-position
    outputs: gradients recomputed in backward with the incoming weights."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan,
                engine: Callable) -> Tensor:
        need = tuple(ctx.needs_input_grad[:3])
        eager = plan.scalar and any(need)
        loss, grads = engine(hidden, weight, bias, plan, plan.coef if eager else None, need)
        ctx.plan, ctx.need, ctx.engine = plan, need, engine
        ctx.grads = grads if eager else None
        ctx.save_for_backward(hidden, weight, bias)
        return (loss * plan.coef).sum() if plan.scalar else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        hidden, weight, bias = ctx.saved_tensors
        if ctx.plan.scalar:
            grads, ctx.grads = ctx.grads, None
            if grads is None:
                raise RuntimeError("seqloss: backward ran twice through the same linear_loss; recompute the "
                                   "loss instead of retain_graph=True")
            scale = None if bool(grad_output == 1) else grad_output.float()
        else:
            _, grads = ctx.engine(hidden, weight, bias, ctx.plan, ctx.plan.coef * grad_output.float(), ctx.need)
            scale = None
        out = []
        for g, like in ((grads.hidden, hidden), (grads.weight if grads.want_weight else None, weight),
                        (grads.bias, bias)):
            if g is not None and scale is not None:
                g.mul_(scale)  # the buffers are ours: scale in place, no second V × H tensor
            out.append(None if g is None else g.view_as(like).to(like.dtype))
        return (*out, None, None)


def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                objective: Any = "mle", **options: Any) -> Tensor:
    """Any objective on ``hidden @ weight.T + bias`` without materialising those logits.

    ``hidden`` (..., N, H), ``weight`` (V, H) (``nn.Linear`` / ``lm_head.weight`` layout), ``bias``
    (V,) or None, ``labels`` (..., N) unshifted. Takes every option of :func:`seqloss.objective_loss`;
    ``impl="reference"`` builds the logits and runs the dense spec.
    """
    common = check_common({k: v for k, v in options.items() if k in COMMON_DEFAULTS})
    check_linear(hidden, weight, bias)
    *lead, N, H = hidden.shape
    lead = tuple(lead)
    V = weight.shape[0]
    check_labels(labels, (*lead, N), V, common.ignore_index, against="hidden")
    members = route_options(check_objective(objective),
                            {k: v for k, v in options.items() if k not in COMMON_DEFAULTS}, V, lead, N)
    B = math.prod(lead)
    hidden3, labels2 = hidden.reshape(B, N, H), labels.reshape(B, N)
    targets = targets_of(labels2, common, V)
    impl = resolve_impl(common.impl, hidden)
    if impl == "reference":
        out = reference_loss(torch.nn.functional.linear(hidden3, weight, bias), targets, members, common)
    else:
        engine = kernels.linear_engine() if impl == "triton" else linear_engine
        out = LinearSupportCrossEntropy.apply(hidden3, weight, bias, plan_of(targets, members, common), engine)
    return finish(out, common, lead, N)
