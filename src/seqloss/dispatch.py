"""The one dispatch point: ``TABLE`` maps (path, impl) to a named runner, ``resolve_impl`` turns
``"auto"`` into an impl (here and nowhere else), and ``finish`` is the final reduction.

Paths: ``"logits"`` (logits (B, N, V)), ``"linear"`` (the fused head: hidden (B, N, H), weight,
bias) and ``"sampled"`` (sampled softmax: hidden, weight). Impls: ``"reference"`` (the dense spec),
``"torch"`` and ``"triton"``. Every runner is ``runner(inputs, call) → Result``. An impl asked for
by name that cannot run raises; nothing falls back silently.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from . import kernels, reference, torch_linear, torch_logits, torch_sampled
from ._validate_parallel import local
from .autograd import Op, compute_dtype
from .call import Call, LossStats, SampledCall
from .parallel import sequence, vocab_logits
from .parallel.collectives import SumGradient, eager
from .plan import Inputs, Plan, Result, SampledPlan, plan_of, sampled_plan_of
from .sampling import Negatives, draw_negatives
from .stats import loss_stats
from .support import example_starts, safe_labels, targets_of


def logits_reference(inputs: Inputs, call: Call) -> Result:
    """The dense spec on logits (B, N, V)."""
    return Result(*reference.objective_loss(inputs[0], call.labels, call.members, **call.common.keywords()))


def linear_reference(inputs: Inputs, call: Call) -> Result:
    """The dense spec on ``F.linear`` logits, in the fused head's compute dtype."""
    dtype = compute_dtype(inputs)
    hidden, weight, bias = (None if x is None else x.to(dtype) for x in inputs)
    assert hidden is not None and weight is not None
    return logits_reference((torch.nn.functional.linear(hidden, weight, bias), None, None), call)


def sampled_reference(inputs: Inputs, call: SampledCall) -> Result:
    """The dense sampled-softmax formula on the full logits (B, N, V), for the call's draws."""
    hidden, weight = inputs[0], inputs[1]
    assert weight is not None and call.negatives is not None
    logits = torch.nn.functional.linear(hidden.float(), weight.float())
    loss = reference.sampled_loss(logits, call.labels, call.negatives.ids, call.negatives.log_expected,
                                  log_q_correction=call.log_q_correction,
                                  remove_accidental_hits=call.remove_accidental_hits, **call.common.keywords())
    return Result(loss, loss.new_empty(0), call.labels.new_empty(0))


def no_sampled_kernel(inputs: Inputs, call: SampledCall) -> Result:
    raise ValueError("impl='triton' cannot run sampled_softmax_loss: it has no Triton kernel (its scores are "
                     "(T, K), one small matmul); use impl='torch' or impl='auto'")


@eager
def logits_vocab_parallel(inputs: Inputs, call: Call) -> Result:
    """This rank's slice of the logits (B, N, V / ranks) — eager: a process group crosses no custom op."""
    return LOGITS_VOCAB_PARALLEL(inputs, call)


@eager
def linear_vocab_parallel(inputs: Inputs, call: Call) -> Result:
    """The head's rows for this rank's slice: its logits, then the logits path. The hidden states'
    gradient is summed over the group (each rank's is a part of it), as a column-parallel layer's."""
    hidden, weight, bias = inputs
    assert weight is not None and call.common.vocab_parallel is not None
    dtype = compute_dtype(inputs)
    hidden = SumGradient.apply(hidden, call.common.vocab_parallel.group)
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return LOGITS_VOCAB_PARALLEL((logits, None, None), call)


LOGITS_TORCH = Op("logits_torch", torch_logits.engine, plan_of, Plan)
LOGITS_VOCAB_PARALLEL = Op("logits_vocab_parallel", vocab_logits.engine, plan_of, Plan)
LOGITS_TRITON = Op("logits_triton", kernels.logits_engine, plan_of, Plan)
LINEAR_TORCH = Op("linear_torch", torch_linear.engine, plan_of, Plan)
LINEAR_TRITON = Op("linear_triton", kernels.linear_engine, plan_of, Plan)
SAMPLED_TORCH = Op("sampled_torch", torch_sampled.engine, sampled_plan_of, SampledPlan)

TABLE: dict[tuple[str, str], Callable[..., Result]] = {
    ("logits", "reference"): logits_reference,
    ("logits", "torch"): LOGITS_TORCH,
    ("logits", "triton"): LOGITS_TRITON,
    ("logits", "vocab_parallel"): logits_vocab_parallel,
    ("linear", "reference"): linear_reference,
    ("linear", "torch"): LINEAR_TORCH,
    ("linear", "triton"): LINEAR_TRITON,
    ("linear", "vocab_parallel"): linear_vocab_parallel,
    ("sampled", "reference"): sampled_reference,
    ("sampled", "torch"): SAMPLED_TORCH,
    ("sampled", "triton"): no_sampled_kernel,
}


# The paths whose Triton kernels ``impl="auto"`` picks on a GPU.
AUTO_TRITON_PATHS = ("logits", "linear")


def resolve_impl(impl: str, device: torch.device, sharded: bool = False, split: bool = False,
                 path: str = "logits") -> str:
    """``"auto"`` → a concrete impl; a named impl that cannot run here raises. On a vocabulary
    shard, ``"auto"`` and ``"torch"`` are ``"vocab_parallel"`` (the only engine that combines shards).
    On a sequence ``split`` over a context-parallel group, the dense spec cannot run (it scores whole
    sequences); every engine can.

    ``"auto"`` is ``"triton"`` on CUDA tensors where Triton is installed, for the ``path``s whose
    kernels are verified against the dense spec on a GPU and timed faster there than the torch engine
    (``AUTO_TRITON_PATHS``; on an H200, benchmarks/RESULTS.md: the fused head's MLE 2.7× faster at
    Llama-3's head, the logits path's 29×; list supports run the same grouped products in both fused
    engines). Everywhere else — CPU, and sampled softmax, which has no kernel (its gathers are
    already matrix products) — it is ``"torch"``.
    """
    if split and impl == "reference":
        raise ValueError("impl='reference' cannot run on a part of each sequence (context_parallel): it scores "
                         "whole sequences; use impl='torch', 'triton' or 'auto'")
    if sharded:
        if impl not in ("auto", "torch"):
            raise ValueError(f"impl={impl!r} cannot run on a vocabulary shard (vocab_parallel or a DTensor sharded "
                             f"on the vocabulary); use impl='torch' or impl='auto'")
        return "vocab_parallel"
    if impl == "triton":
        reason: Optional[str] = kernels.unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run: {reason}; use impl='torch' or impl='auto'")
    if impl == "auto":
        kernels_here = device.type == "cuda" and kernels.unavailable_reason(device) is None
        return "triton" if path in AUTO_TRITON_PATHS and kernels_here else "torch"
    return impl


def logits_loss(logits: Tensor, call: Call) -> Union[Tensor, LossStats]:
    """logits (..., N, V) of a validated call → the loss (or, when statistics are asked for, LossStats)."""
    logits = local(logits)
    c = call.common
    impl = resolve_impl(c.impl, logits.device, c.vocab_parallel is not None, c.context_parallel is not None)
    N = call.N if c.context_parallel is None else c.context_parallel.positions.numel()
    result = TABLE["logits", impl]((logits.reshape(call.labels.shape[0], N, logits.shape[-1]), None, None), call)
    return finish(result, call)


def linear_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], call: Call) -> Union[Tensor, LossStats]:
    """hidden (..., N, H) and the head of a validated call → the loss (or LossStats)."""
    hidden, weight, bias = local(hidden), local(weight), local(bias)
    c = call.common
    impl = resolve_impl(c.impl, hidden.device, c.vocab_parallel is not None, c.context_parallel is not None,
                        path="linear")
    N = call.N if c.context_parallel is None else c.context_parallel.positions.numel()
    result = TABLE["linear", impl]((hidden.reshape(call.labels.shape[0], N, hidden.shape[-1]), weight, bias), call)
    return finish(result, call)


def sampled_loss(hidden: Tensor, weight: Tensor, call: SampledCall) -> Tensor:
    """hidden (..., N, H) and the head of a validated sampled-softmax call → the loss. The negatives
    are drawn here, once, before the branch: every impl scores the same draws."""
    impl = resolve_impl(call.common.impl, hidden.device, path="sampled")
    t = targets_of(call.labels, call.common, call.vocab_size)
    labels = safe_labels(t, call.common).reshape(-1)
    drawn = draw_negatives(call.sampler, call.num_negatives, call.vocab_size, labels, t.target_mask.reshape(-1),
                           not call.share_negatives, call.generator)
    drawn = Negatives(drawn.ids.to(weight.device), drawn.log_expected.to(weight.device))
    call = dataclasses.replace(call, negatives=drawn)
    result = TABLE["sampled", impl]((hidden.reshape(-1, call.N, hidden.shape[-1]), weight, None), call)
    out = finish(result, call)
    assert isinstance(out, Tensor)
    return out


def reduce(out: Tensor, call: Union[Call, SampledCall]) -> Tensor:
    """A runner's loss → the caller's shape: a scalar as it is, (..., N) for "none", (...) for
    "sequence" — or, with ``position_ids``, (E,): one sum per packed example, in row-major order.
    Under context parallelism ``out`` holds this rank's positions: "none" returns them, and the
    others are this rank's part of the sums (``finish`` adds the parts over the group)."""
    reduction = call.common.reduction
    context = call.common.context_parallel if isinstance(call, Call) else None
    if reduction == "none":
        return out.reshape(*call.lead, out.shape[-1])
    if reduction != "sequence":
        return out
    position_ids = call.common.position_ids
    if position_ids is None:
        return out.sum(-1).reshape(call.lead)
    starts = example_starts(position_ids)
    example = (starts.reshape(-1).long().cumsum(0) - 1).view_as(starts)
    if context is not None:
        example = example[:, context.positions]
    return out.new_zeros(int(starts.sum())).index_add(0, example.reshape(-1), out.reshape(-1))


def finish(result: Result, call: Union[Call, SampledCall]) -> Union[Tensor, LossStats]:
    """The final reduction, and when statistics are asked for the ``LossStats`` of the same pass."""
    loss = _whole(reduce(result.loss, call), call)
    if not call.common.return_stats:
        return loss
    assert isinstance(call, Call)
    return loss_stats(loss, _whole(reduce(result.z_part, call), call).detach(), result.predicted, call)


def _whole(out: Tensor, call: Union[Call, SampledCall]) -> Tensor:
    """Under context parallelism, a reduced output summed over the group (but "none", per position)."""
    context = call.common.context_parallel if isinstance(call, Call) else None
    if context is None or call.common.reduction == "none":
        return out
    return sequence.sum_over_group(out, context.group)
