"""The plan every engine walks, and the engines' contract.

A validated call becomes a plan: the shifted labels, each position's weight in the output, and the
objective as *support parts* — positions that score every id but an exclusion list (a full part),
or the label plus a candidate list (a list part). A plan holds no objective names and no option
names beyond what the math reads (``softmax``): engines, torch or Triton, only ever see parts.

The plan is also the one value that crosses the custom-op boundary under ``torch.compile``:
``Plan.arguments`` and ``Plan.from_arguments`` are the one place that flattens it into the
lists a custom op takes, and rebuilds it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ._buffers import GradTriple
from .call import Call, Common, SampledCall, SoftmaxOptions, VocabParallel
from .support import OBJECTIVES, FullSupport, ListSupport, Targets, safe_labels, shift_values, targets_of

Inputs = tuple[Tensor, Optional[Tensor], Optional[Tensor]]  # logits; or hidden, weight, bias
Need = tuple[bool, bool, bool]                              # which inputs want a gradient
Arguments = tuple[list[Optional[Tensor]], list[float]]      # a plan as custom-op arguments


class SupportPart(NamedTuple):
    """One part of a member's support over some positions: a full part (``ids`` None: every id but
    ``exclude`` (L, K), one list per sequence) or a list part (the label plus ``ids`` (L, 1, K) per
    sequence or (B, N, K) per position; ``listed``: each position's label is one of its list's ids)."""

    alpha: float
    exclude: Optional[Tensor]
    ids: Optional[Tensor]
    positions: Tensor  # (B, N) bool
    listed: bool = False


@dataclass
class Plan:
    """What an engine needs to score an objective, built once per call from validated inputs."""

    labels: Tensor            # (B, N) long, 0 where there is no target (safe to gather)
    target_mask: Tensor       # (B, N) bool, True = has a target
    coef: Tensor              # (B, N) fp32 weight of each position's loss in the output (0 = no target)
    parts: list[SupportPart]  # every member's parts, in order
    # (B, N) long: the list of each position among a part's per-sequence lists, when sequences are
    # not rows (packed examples, turns); None: the list of row b is list b.
    sequence: Optional[Tensor]
    softmax: SoftmaxOptions
    scalar: bool              # the output is Σ coef·loss (mean / sum), else coef·loss per position
    stats: bool = False       # also hand back each position's z-loss term and argmax (statistics asked for)
    shard: Optional[VocabParallel] = None  # the scores hold this slice of the vocabulary (ids are global)
    exact: bool = False       # fused head: accumulate gradients in fp32 (else the Triton engine uses the compute dtype)

    def list_of(self, b: Tensor, n: Tensor) -> Tensor:
        """Which of a part's per-sequence lists the positions (b, n) use."""
        return b if self.sequence is None else self.sequence[b, n]

    def at(self, positions: Tensor) -> Plan:
        """The plan of the whole sequences, restricted to ``positions`` (N_local,) of each — what a
        rank of a context-parallel group scores. Supports, weights and sequences come from the whole
        labels, so each list and each weight is the whole sequence's."""
        N = self.labels.shape[1]

        def take(x: Tensor) -> Tensor:
            return x[:, positions]

        # per-position lists are (B, N, K); per-sequence ones (L, 1, K) stay whole (with N = 1 either is right)
        per_position = [p.ids is not None and p.ids.shape[1] == N > 1 for p in self.parts]
        parts = [p._replace(ids=take(p.ids) if each and p.ids is not None else p.ids, positions=take(p.positions))
                 for p, each in zip(self.parts, per_position)]
        sequence = None if self.sequence is None else take(self.sequence)
        if sequence is not None and N > 1 and positions.numel() == 1:
            # One position per row: engines would read per-position lists (B, 1, K) as per-sequence
            # ones, so every list becomes its row's, and the rows are the sequences.
            row = sequence[:, 0]
            parts = [p._replace(exclude=None if p.exclude is None else p.exclude[row],
                                ids=p.ids if p.ids is None or each else p.ids[row])
                     for p, each in zip(parts, per_position)]
            sequence = None
        return dataclasses.replace(self, labels=take(self.labels), target_mask=take(self.target_mask),
                                   coef=take(self.coef), parts=parts, sequence=sequence)

    def arguments(self) -> Arguments:
        assert self.shard is None, "a process group cannot cross a custom op: vocabulary-parallel calls run eagerly"
        tensors = [self.labels, self.target_mask, self.coef, self.sequence]
        scalars = [float(self.scalar), float(self.stats), float(self.exact), *self.softmax]
        for part in self.parts:
            tensors += [part.exclude, part.ids, part.positions]
            scalars += [part.alpha, float(part.listed)]
        return tensors, scalars

    @classmethod
    def from_arguments(cls, tensors: Sequence[Optional[Tensor]], scalars: Sequence[float]) -> Plan:
        labels, target_mask, coef, sequence = tensors[:4]
        assert labels is not None and target_mask is not None and coef is not None
        parts = [SupportPart(alpha, tensors[4 + 3 * i], tensors[5 + 3 * i], tensors[6 + 3 * i],  # type: ignore[arg-type]
                             bool(listed)) for i, (alpha, listed) in enumerate(zip(scalars[6::2], scalars[7::2]))]
        return cls(labels, target_mask, coef, parts, sequence, SoftmaxOptions(*scalars[3:6]), bool(scalars[0]),
                   bool(scalars[1]), exact=bool(scalars[2]))


@dataclass
class SampledPlan:
    """What the sampled-softmax engine needs: the targets, their weights and the drawn negatives."""

    labels: Tensor              # (B, N) long, 0 where there is no target
    target_mask: Tensor         # (B, N) bool
    coef: Tensor                # (B, N) fp32
    negatives: Tensor           # (K,) shared by every position, or (B·N, K) one set per position
    lowering: Optional[Tensor]  # log(K·q) of each draw (the log-Q correction), or None
    softmax: SoftmaxOptions
    remove_accidental_hits: bool
    scalar: bool
    stats: bool = False

    def arguments(self) -> Arguments:
        return ([self.labels, self.target_mask, self.coef, self.negatives, self.lowering],
                [float(self.scalar), float(self.remove_accidental_hits), *self.softmax])

    @classmethod
    def from_arguments(cls, tensors: Sequence[Optional[Tensor]], scalars: Sequence[float]) -> SampledPlan:
        labels, target_mask, coef, negatives, lowering = tensors
        assert labels is not None and target_mask is not None and coef is not None and negatives is not None
        return cls(labels, target_mask, coef, negatives, lowering, SoftmaxOptions(*scalars[2:]), bool(scalars[1]),
                   bool(scalars[0]))


class EngineOutput(NamedTuple):
    """What an engine's forward hands back: per-position losses (B, N) fp32 (unweighted, 0 off
    target), the gradients of Σ coef·loss when it made them in forward (None each otherwise), and
    with ``plan.stats`` each position's z-loss term (B, N) and argmax over the vocabulary (B, N)."""

    loss: Tensor
    grads: GradTriple = (None, None, None)
    z_part: Optional[Tensor] = None
    predicted: Optional[Tensor] = None


class Engine(NamedTuple):
    """An engine: ``forward(inputs, plan, need, dtype) → EngineOutput``, computing the gradients
    ``need`` asks for (all False: none); ``backward(inputs, plan, weights (B, N), need, dtype)`` →
    the gradients of Σ weights·loss (recomputed), for outputs whose gradients forward cannot make.
    ``rowwise``: each gradient row belongs to one position (the logits'), so gradients made in
    forward also serve per-position outputs, scaled row by row."""

    forward: Callable[..., EngineOutput]
    backward: Optional[Callable[..., GradTriple]]
    rowwise: bool


def grads_in_forward(engine: Engine, plan: Plan | SampledPlan) -> bool:
    """Whether forward makes the gradients (then backward only scales them)."""
    return plan.scalar or engine.rowwise


class Result(NamedTuple):
    """A runner's output before the final reduction: the loss (a scalar, or (B, N) weighted per
    position), its z-loss part alike, and the argmax ids (B, N) (valid at supervised positions)."""

    loss: Tensor
    z_part: Tensor
    predicted: Tensor


# --- helpers the engines share ------------------------------------------------------------------------


def sequence_groups(sequence: Tensor, positions: Tensor, count: int) -> tuple[Tensor, Tensor, list[int]]:
    """(count, M) long: the flat indices of the listed ``positions`` (B, N) of each sequence, in
    order, -1 padded (M = the most in any sequence, ≥ 1), and how many each sequence has: (count,)
    on the device, and as a list read from it once (the only synchronisation). Engines use it to score each sequence's
    positions against its one list, as they score a row's positions against a row's list."""
    seq, on = sequence.reshape(-1), positions.reshape(-1).long()
    counts = torch.zeros(count, dtype=torch.long, device=seq.device).index_add_(0, seq, on)
    sizes = counts.tolist()
    M = max(max(sizes, default=0), 1)
    # A position's place in its sequence: the listed positions before it (row-major) minus those of
    # the sequences before (sequences are runs in row-major order). The others go to a spare row.
    offset = on.cumsum(0) - on - (counts.cumsum(0) - counts)[seq]
    groups = torch.full((count + 1, M), -1, dtype=torch.long, device=seq.device)
    groups[torch.where(on > 0, seq, count), offset.clamp(0, M - 1)] = torch.arange(seq.numel(), device=seq.device)
    return groups[:count], counts, sizes


def mostly(positions: Tensor) -> bool:
    """Whether at least half of the positions are set: then streaming every position in order
    (slices, no gathers) beats visiting only the listed ones."""
    return 2 * int(positions.sum()) >= positions.numel()


# --- plans from calls ------------------------------------------------------------------------------------


def position_weights(t: Targets, c: Common) -> Tensor:
    """(B, N) fp32 weight of each position's loss in the output: 1 where there is a target, times
    its label's class weight (``F.cross_entropy(weight=...)``) and its own token weight (given in
    the labels' layout, so shifted with them); for ``"mean"`` divided by ``num_items_in_batch``, or
    by the sum of the weights (1 when it is 0: nothing supervised gives 0, not NaN)."""
    weights = t.target_mask.float()
    if c.class_weight is not None:
        weights = weights * c.class_weight[safe_labels(t, c)]
    if c.token_weights is not None:
        weights = weights * (shift_values(c.token_weights, 0.0) if c.shift else c.token_weights)
    if c.reduction != "mean":
        return weights
    if c.num_items_in_batch is not None:
        denominator = torch.as_tensor(c.num_items_in_batch, dtype=torch.float32, device=weights.device)
    else:
        total = weights.sum()
        denominator = torch.where(total > 0, total, torch.ones_like(total))
    return weights / denominator


def support_parts(supports: list[tuple[float, FullSupport | ListSupport]], target_mask: Tensor) -> list[SupportPart]:
    """[(weight, support)] → parts, in order: the one place that splits SMILE's first tokens (all V
    ids) from its list positions."""
    parts = []
    for alpha, support in supports:
        if alpha == 0:
            continue
        if isinstance(support, FullSupport):
            parts.append(SupportPart(alpha, support.exclude, None, target_mask))
            continue
        list_positions = target_mask
        if support.full_positions is not None:  # a subset of the target positions
            list_positions = target_mask ^ support.full_positions
            parts.append(SupportPart(alpha, None, None, support.full_positions))
        parts.append(SupportPart(alpha, None, support.ids, list_positions, support.labels_listed))
    return parts


def plan_of(call: Call) -> Plan:
    """The support rules of the call's members (random draws happen here) and the position weights."""
    c = call.common
    t = targets_of(call.labels, c, call.vocab_size)
    supports = [(m.weight, OBJECTIVES[m.name].build(t, **m.options)) for m in call.members]
    plan = Plan(safe_labels(t, c), t.target_mask, position_weights(t, c),
                support_parts(supports, t.target_mask), None if t.sequences is None else t.sequences.index,
                c.softmax, scalar=c.reduction in ("mean", "sum"), stats=c.return_stats, shard=c.vocab_parallel,
                exact=c.exact_accumulation)
    return plan if c.context_parallel is None else plan.at(c.context_parallel.positions)


def sampled_plan_of(call: SampledCall) -> SampledPlan:
    """The targets, weights and drawn negatives (``call.negatives``) of a sampled-softmax call."""
    c = call.common
    t = targets_of(call.labels, c, call.vocab_size)
    assert call.negatives is not None  # drawn by the dispatch, once, before the branch
    lowering = call.negatives.log_expected if call.log_q_correction else None
    return SampledPlan(safe_labels(t, c), t.target_mask, position_weights(t, c),
                       call.negatives.ids, lowering, c.softmax, call.remove_accidental_hits,
                       scalar=c.reduction in ("mean", "sum"))
