"""The call's data model: the keywords a public call takes, what the validator makes of them, and
what a call returns. Below both the validator (which builds these values) and the plan (which reads
them), so neither imports the other's types.

The keywords are typed dicts used as ``**options: Unpack[...]`` (PEP 692): a type checker or an
editor rejects a misspelt keyword; at run time ``_validate`` rejects it for untyped callers.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, NamedTuple, Optional, TypedDict, Union

import torch
from torch import Tensor

from .sampling import Negatives

# An objective: a name, or a mixture name -> weight such as {"mle": 0.01, "smile": 0.99}.
Objective = Union[str, Mapping[str, float]]
Reduction = Literal["mean", "sum", "none", "sequence"]
Impl = Literal["auto", "reference", "torch", "triton"]


class BaseOptions(TypedDict, total=False):
    """The keywords every loss takes, ``sampled_softmax_loss`` included (DESIGN §2).

    * ``shift=False`` — ``True`` scores ``logits[..., n, :]`` against ``labels[..., n + 1]`` (causal
      LMs, BLIP); labels always come in unshifted, as Hugging Face passes them.
    * ``ignore_index=-100`` — positions with this label contribute nothing.
    * ``label_smoothing=0.0`` — ε spread over each position's support:
      ``(1-ε)·nll + ε·mean_{v∈S}(-log p_v)``.
    * ``reduction="mean"`` — ``"mean"`` (÷ the supervised positions' weight, or ÷
      ``num_items_in_batch``), ``"sum"``, ``"none"`` (the labels' shape, aligned with the logits
      positions, 0 where there is no target), ``"sequence"`` (per-row sums, BLIP's
      ``reduction='none'``; with ``position_ids``, a 1-D tensor of one sum per packed example, in
      row-major order — padding whose positions restart counts as examples of its own, each summing
      to 0 — not traceable by ``torch.compile``, its length being data).
    * ``num_items_in_batch=None`` — Hugging Face's gradient-accumulation denominator of ``"mean"``.
    * ``impl="auto"`` — ``"reference"`` (dense spec), ``"torch"`` (efficient, any device), ``"triton"``
      (GPU kernels; CPU tensors only under ``TRITON_INTERPRET=1``), ``"auto"`` (``"triton"`` for the
      fused head on CUDA tensors with Triton installed, else ``"torch"``).
    * ``position_ids=None`` — (..., N), Hugging Face's padding-free convention
      (``DataCollatorWithFlattening``, TRL's ``packing``/``padding_free``): a packed example starts
      wherever the positions do not count on from the previous one (a restart at 0). Each example is
      its own sequence: its own SMILE and reverse-subset token set, its own first supervised
      position, and with ``shift=True`` its last position has no target. A packed row's loss and
      gradients equal those of its examples as separate rows, for every objective.
    * ``token_weights=None`` — (..., N) floats >= 0 in the labels' layout (unshifted, like the
      labels): each position's loss times the weight of its label; ``"mean"`` divides by the
      supervised positions' weight sum (or by ``num_items_in_batch``), ``"none"``/``"sequence"``
      return weighted losses. Multiplies with class weights. Weights never change a support: a label
      of weight 0 still enters its sequence's SMILE set (NeMo's ``loss_weights``, per-item weights
      of recommenders).
    """

    shift: bool
    ignore_index: int
    label_smoothing: float
    reduction: Reduction
    num_items_in_batch: Union[int, Tensor, None]
    impl: Impl
    position_ids: Optional[Tensor]
    token_weights: Optional[Tensor]


class CommonOptions(BaseOptions, total=False):
    """The keywords every objective takes, on logits and on the fused head, besides ``BaseOptions``.

    * ``turns=False`` — ``True`` makes each maximal run of supervised labels its own sequence (its
      own token set and first-token MLE): multi-turn chats whose non-assistant tokens are
      ``ignore_index``. Runs never cross packed examples.
    * ``softcap=None`` — c: the logits become c·tanh(z / c) before the softmax (Gemma 2/3's
      ``final_logit_softcapping``), each logit capped as the engine reads or makes it (no copy).
    * ``z_loss=0.0`` — ζ: each supervised position adds ζ·lse², lse over its support (PaLM's z-loss
      for MLE, 1e-4 there), weighted and reduced like the loss.
    * ``vocab_parallel=None`` — a ``VocabParallel``: the logits (or the head's weight) given are this
      rank's slice of the vocabulary, as Megatron-LM passes them; labels and every other tensor are
      whole, the same on every rank of the group. Logits given as a DTensor sharded on the
      vocabulary (torchtitan's ``loss_parallel``) need no keyword.
    * ``context_parallel=None`` — a ``ContextParallel``: the logits (or hidden states) given hold
      these positions of every sequence; labels, ``position_ids`` and ``token_weights`` are whole
      (..., N), the same on every rank of the group. The loss returned is the whole batch's on every
      rank; each rank's gradient is its positions' part.
    """

    turns: bool
    softcap: Optional[float]
    z_loss: float
    vocab_parallel: Optional[VocabParallel]
    context_parallel: Optional[ContextParallel]


class LogitsOptions(CommonOptions, total=False):
    """The keywords of the functions on logits: ``CommonOptions`` and ``weight=None``, (V,)
    class weights with ``F.cross_entropy(weight=...)``'s semantics — a position's loss times its
    label's weight, the mean divided by the sum of those weights (or by ``num_items_in_batch``); for
    subset objectives likewise the weight of the label's class. Not with label smoothing."""

    weight: Optional[Tensor]


class MemberOptions(TypedDict, total=False):
    """The objectives' own keywords; a mixture hands each to the members that take it.

    * ``first_token_mle=True`` (smile) — the first supervised position of each sequence scores all V ids.
    * ``exclude_ids=()`` (smile, random_subset, reverse_subset) — ids left out of the support.
    * ``num_samples=10``, ``generator=None`` (random_subset) — ids drawn per position, and from what.
    * ``eos_token_id`` (selective_eos) — out of the support unless it is the label.
    * ``include`` / ``exclude`` (subset) — candidates (..., K) per row or (..., N, K) per label
      position, or every id but (..., K) per row; negative entries are padding.
    """

    first_token_mle: bool
    exclude_ids: Sequence[int]
    num_samples: int
    generator: Optional[torch.Generator]
    eos_token_id: int
    include: Optional[Tensor]
    exclude: Optional[Tensor]


class ObjectiveOptions(LogitsOptions, MemberOptions, total=False):
    """The keywords of ``seqloss.objective_loss``."""


class LinearOptions(CommonOptions, MemberOptions, total=False):
    """The keywords of ``seqloss.linear_loss``: its ``weight`` is the head, so class weights are
    ``class_weight=``; and ``exact_accumulation=False``: with bf16/fp16 inputs the Triton engine
    accumulates the hidden and weight gradients in that dtype where the GPU adds it atomically in
    hardware (bf16 from Hopper, sm_90), each tile's fp32 sum rounded as it is added (Cut
    Cross-Entropy's default: no fp32 buffer of the head's size); ``True`` accumulates
    in fp32 and rounds once, at the cost of an fp32 buffer of each gradient (3× the bf16 weight
    gradient's memory while it lives) and a cast. The torch engine always accumulates in fp32."""

    class_weight: Optional[Tensor]
    exact_accumulation: bool


@dataclass(frozen=True)
class VocabParallel:
    """This rank's slice of a vocabulary-sharded head: ids ``[start, stop)`` of ``vocab_size``, the
    other slices held by the ranks of ``group`` (a ``torch.distributed`` process group; None: the
    default group). ``VocabParallel.even`` makes the slices ``torch.chunk`` (and DTensor's
    ``Shard``) makes."""

    start: int
    stop: int
    vocab_size: int
    group: Any = None

    @classmethod
    def even(cls, vocab_size: int, group: Any = None) -> VocabParallel:
        """This rank's slice when ``vocab_size`` ids are split in order over the group's ranks,
        ceil(V / ranks) each (the last ones smaller or empty)."""
        import torch.distributed as dist
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk = -(-vocab_size // size)
        start = min(rank * chunk, vocab_size)
        return cls(start, min(start + chunk, vocab_size), vocab_size, group)


@dataclass(frozen=True)
class ContextParallel:
    """The positions of each sequence this rank's scores hold (a sequence split over ``group``'s
    ranks, as context parallelism splits it): ``positions`` (N_local,) ascending ids in [0, N).
    ``even`` makes contiguous slices; ``load_balanced`` the two chunks per rank (r and 2R-1-r of 2R)
    that causal ring attention balances its work with."""

    positions: Tensor
    group: Any = None

    @classmethod
    def even(cls, length: int, group: Any = None) -> ContextParallel:
        import torch.distributed as dist
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        chunk = -(-length // size)
        return cls(torch.arange(min(rank * chunk, length), min((rank + 1) * chunk, length)), group)

    @classmethod
    def load_balanced(cls, length: int, group: Any = None) -> ContextParallel:
        import torch.distributed as dist
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        chunks = torch.arange(length).tensor_split(2 * size)
        return cls(torch.cat([chunks[rank], chunks[2 * size - 1 - rank]]), group)


class SoftmaxOptions(NamedTuple):
    """The options the per-position math reads, carried as one value from the validator to the math."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0              # 0: no cap


@dataclass(frozen=True)
class Common:
    """The common keywords of a call, validated; tensors moved to the scores' device and flattened
    to (B, N) where they are per position."""

    shift: bool = False
    ignore_index: int = -100
    reduction: str = "mean"
    num_items_in_batch: Union[int, float, Tensor, None] = None
    impl: str = "auto"
    position_ids: Optional[Tensor] = None
    turns: bool = False
    class_weight: Optional[Tensor] = None   # (V,) fp32
    token_weights: Optional[Tensor] = None  # (B, N) fp32, unshifted
    return_stats: bool = False
    softmax: SoftmaxOptions = SoftmaxOptions()
    vocab_parallel: Optional[VocabParallel] = None
    context_parallel: Optional[ContextParallel] = None
    exact_accumulation: bool = False

    def keywords(self) -> dict[str, Any]:
        """Every option as the keyword it came as (the dense spec takes them so), but the shard (the
        spec scores whole logits) and how engines accumulate (the spec has one way)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("softmax", "vocab_parallel", "context_parallel", "exact_accumulation")}
        return {**out, **self.softmax._asdict()}


class Member(NamedTuple):
    """One member of an objective: its weight in the mixture, its name and its own options."""

    weight: float
    name: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Call:
    """A validated call on logits (..., N, V) or through the fused head, labels flattened to (B, N)."""

    common: Common
    members: tuple[Member, ...]
    labels: Tensor              # (B, N) on the scores' device, unshifted
    lead: tuple[int, ...]       # the labels' leading shape (...)
    N: int
    vocab_size: int


@dataclass(frozen=True)
class SampledCall:
    """A validated ``sampled_softmax_loss`` call; ``negatives`` are drawn by the dispatch, once."""

    common: Common
    labels: Tensor              # (B, N) on the hidden states' device, unshifted
    lead: tuple[int, ...]
    N: int
    vocab_size: int
    num_negatives: int
    sampler: Union[str, Tensor]  # a name, or (V,) float64 weights on the hidden states' device
    log_q_correction: bool
    remove_accidental_hits: bool
    share_negatives: bool
    generator: Optional[torch.Generator]
    negatives: Optional[Negatives] = None


@dataclass
class LossStats:
    """What ``return_stats=True`` returns: the loss and what the loss's own pass computed besides it."""

    loss: Tensor            # the reduced loss, exactly as without return_stats (differentiable)
    z_loss: Tensor          # the z-loss part of ``loss``, reduced like it (detached; 0 without z_loss)
    token_accuracy: Tensor  # fp32 scalar: share of supervised positions whose argmax is the label (0 if none)
    predicted_ids: Tensor   # (..., N) long: the argmax over the whole vocabulary at supervised positions,
    #                         ignore_index elsewhere (aligned with the shifted labels)
