"""Every input check, once, before any branch: :func:`check_call` is the one entry every public
call goes through (the functions, ``linear_loss``, the modules and ``seqloss.hf``);
``sampled_softmax_loss`` adds its own options on top of these checks in ``_validate_sampled``.

Errors name the argument: a ``TypeError`` for a wrong kind of thing, a ``ValueError`` for a wrong
value. Checks never modify their inputs; the normalised values they return are new objects (labels
and candidate lists moved to the logits' device, as Hugging Face's ``ForCausalLMLoss`` moves labels).

Checks that read tensor values (label range, candidate ids, ``num_items_in_batch``) run in eager
mode only: under ``torch.compile`` they would need the data on the host mid-graph, which breaks
``fullgraph=True``; shapes, dtypes and option values are still checked while tracing.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .support import OBJECTIVES

REDUCTIONS = ("mean", "sum", "none", "sequence")
IMPLS = ("auto", "reference", "torch", "triton")
COMMON_DEFAULTS = dict(shift=False, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                       num_items_in_batch=None, impl="auto", position_ids=None, turns=False, softcap=None,
                       z_loss=0.0, class_weight=None, return_stats=False)


@dataclass(frozen=True)
class Common:
    shift: bool
    ignore_index: int
    label_smoothing: float
    reduction: str
    num_items_in_batch: Optional[Union[int, Tensor]]
    impl: str
    position_ids: Optional[Tensor] = None  # after check_call: (B, N) long on the scores' device
    turns: bool = False
    softcap: Optional[float] = None        # c: the logits become c·tanh(z / c) before the softmax
    z_loss: float = 0.0                    # coefficient of lse² per supervised position
    class_weight: Optional[Tensor] = None  # (V,) after check_call: fp32 on the scores' device
    return_stats: bool = False


Member = tuple[float, str, dict[str, Any]]  # (weight, objective name, its options)


@dataclass(frozen=True)
class Call:
    """A validated call: options, members, and the labels (B, N) on the scores' device."""

    common: Common
    members: list[Member]
    labels: Optional[Tensor]    # (B, N) flattened; None when only options were checked
    lead: tuple[int, ...]       # the leading shape of the labels
    N: int
    vocab_size: Optional[int]


def tracing() -> bool:
    """True while torch.compile traces: data-dependent checks are skipped (see the module docstring)."""
    return torch.compiler.is_compiling()


def check_call(objective: Any, options: Mapping[str, Any], *, logits: Any = None, hidden: Any = None,
               weight: Any = None, bias: Any = None, labels: Any = None,
               vocab_size: Optional[int] = None) -> Call:
    """The one validation entry.

    * ``logits`` (..., N, V) and ``labels``: a call on logits;
    * ``hidden`` (..., N, H), ``weight`` (V, H), ``bias`` and ``labels``: a fused-head call;
    * neither: the objective and options alone (``seqloss.hf`` at patch time), ids checked against
      ``vocab_size`` when given; per-call candidate lists (``include``/``exclude``) are left to the call.
    """
    if "weight" in options:  # the logits functions take class weights as torch does, ``weight=``
        if "class_weight" in options:
            raise TypeError("pass class weights once, as weight= or as class_weight=")
        options = {("class_weight" if k == "weight" else k): v for k, v in options.items()}
    common = check_common({k: v for k, v in options.items() if k in COMMON_DEFAULTS})
    others = {k: v for k, v in options.items() if k not in COMMON_DEFAULTS}
    objectives = check_objective(objective)
    if logits is None and hidden is None:
        if common.class_weight is not None and vocab_size is not None:
            check_class_weight(common.class_weight, vocab_size)
        others = {k: v for k, v in others.items() if k not in ("include", "exclude")}
        return Call(common, route_options(objectives, others, vocab_size, None, 0), None, (), 0, vocab_size)
    if hidden is not None:
        check_linear(hidden, weight, bias)
        scores, vocab, against = hidden, weight.shape[0], "hidden"
    else:
        check_logits(logits)
        scores, vocab, against = logits, logits.shape[-1], "logits"
    *lead_list, N = scores.shape[:-1]
    lead = tuple(lead_list)
    check_labels(labels, (*lead, N), vocab, common.ignore_index, against=against)
    members = route_options(objectives, others, vocab, lead, N, scores.device)
    flat = labels.to(scores.device).reshape(math.prod(lead), N)
    if common.position_ids is not None:
        check_position_ids(common.position_ids, tuple(labels.shape), common.reduction)
        common = dataclasses.replace(common, position_ids=common.position_ids.to(scores.device).reshape(flat.shape))
    if common.class_weight is not None:
        check_class_weight(common.class_weight, vocab)
        common = dataclasses.replace(common, class_weight=common.class_weight.to(scores.device, torch.float32))
    return Call(common, members, flat, lead, N, vocab)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_common(options: Mapping[str, Any]) -> Common:
    c = Common(**{**COMMON_DEFAULTS, **options})
    if not isinstance(c.shift, bool):
        raise TypeError(f"shift must be a bool, got {type(c.shift).__name__}")
    if not is_int(c.ignore_index):
        raise TypeError(f"ignore_index must be an int, got {type(c.ignore_index).__name__}")
    if not isinstance(c.label_smoothing, numbers.Real) or isinstance(c.label_smoothing, bool):
        raise TypeError(f"label_smoothing must be a float, got {type(c.label_smoothing).__name__}")
    if not 0.0 <= float(c.label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
    if c.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {c.reduction!r}")
    if c.impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {c.impl!r}")
    if not isinstance(c.turns, bool):
        raise TypeError(f"turns must be a bool, got {type(c.turns).__name__}")
    if c.position_ids is not None and not isinstance(c.position_ids, Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor or None, got {type(c.position_ids).__name__}")
    if not isinstance(c.return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(c.return_stats).__name__}")
    if c.softcap is not None:
        if not isinstance(c.softcap, numbers.Real) or isinstance(c.softcap, bool):
            raise TypeError(f"softcap must be a positive number or None, got {type(c.softcap).__name__}")
        if not (math.isfinite(c.softcap) and c.softcap > 0):
            raise ValueError(f"softcap must be a positive finite number, got {c.softcap}")
    if not isinstance(c.z_loss, numbers.Real) or isinstance(c.z_loss, bool):
        raise TypeError(f"z_loss must be a float, got {type(c.z_loss).__name__}")
    if not (math.isfinite(c.z_loss) and c.z_loss >= 0):
        raise ValueError(f"z_loss must be a finite coefficient >= 0, got {c.z_loss}")
    if c.class_weight is not None:
        if not isinstance(c.class_weight, Tensor):
            raise TypeError(f"class weights must be a torch.Tensor or None, got {type(c.class_weight).__name__}")
        if float(c.label_smoothing) > 0:
            raise ValueError("class weights with label_smoothing > 0 are not supported (torch weights the "
                             "smoothing term per class, over the whole vocabulary, which subsets do not have)")
    k = c.num_items_in_batch
    if k is not None:
        if isinstance(k, Tensor):
            if k.numel() != 1:
                raise ValueError("num_items_in_batch must be a single positive number")
            if tracing():
                return c
            if k.is_floating_point() and not torch.isfinite(k).all():
                raise ValueError("num_items_in_batch must be a single positive number")
            value = k.item()
        elif isinstance(k, numbers.Real) and not isinstance(k, bool):
            value = k
        else:
            raise TypeError(f"num_items_in_batch must be an int or a tensor, got {type(k).__name__}")
        if not value > 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {value}")
    return c


def check_logits(logits: Any, name: str = "logits", last: str = "V") -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be floating point (fp32, bf16 or fp16), got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{name} must have shape (..., N, {last}), got {tuple(logits.shape)}")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dimension {last} >= 1, got {tuple(logits.shape)}")


def check_linear(hidden: Any, weight: Any, bias: Any) -> None:
    """The fused head: hidden (..., N, H), weight (V, H), bias (V,) or None, floating point.

    Dtypes may differ (a bf16 hidden with an fp32 weight, the usual mixed-precision set-up): the
    head then runs in autocast's dtype under autocast, else in the widest of the three.
    """
    check_logits(hidden, "hidden", last="H")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight width {weight.shape[1]} does not match hidden width {hidden.shape[-1]}: "
                         f"weight must be (V, H) like nn.Linear / lm_head.weight")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1)")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")


def check_labels(labels: Any, expected_shape: Sequence[int], vocab_size: int, ignore_index: int,
                 against: str = "logits") -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer ids (torch.long), got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {against}: expected "
                         f"{tuple(expected_shape)}")
    if tracing():
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = int(labels[bad].flatten()[0])
        raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; found {value}")


def check_position_ids(position_ids: Tensor, labels_shape: tuple[int, ...], reduction: str) -> None:
    """Hugging Face's padding-free ``position_ids``: integer, the labels' shape, >= 0 (0 = an example starts)."""
    if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
        raise TypeError(f"position_ids must hold integer positions (torch.long), got {position_ids.dtype}")
    if tuple(position_ids.shape) != labels_shape:
        raise ValueError(f"position_ids shape {tuple(position_ids.shape)} does not match the labels' {labels_shape}")
    if tracing():
        if reduction == "sequence":
            raise ValueError("reduction='sequence' with position_ids returns one sum per packed example, a "
                             "data-dependent shape that torch.compile cannot trace; use reduction='none'")
        return
    if bool((position_ids < 0).any()):
        raise ValueError(f"position_ids must be >= 0 (0 marks where a packed example starts), "
                         f"found {int(position_ids.min())}")


def check_class_weight(weight: Tensor, vocab_size: int) -> None:
    """Class weights: (V,) floating point, finite, >= 0 (torch's ``cross_entropy(weight=...)``)."""
    if not weight.is_floating_point() or tuple(weight.shape) != (vocab_size,):
        raise ValueError(f"class weights must be a floating-point tensor of shape ({vocab_size},), one per id, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if not tracing() and (not bool(torch.isfinite(weight).all()) or bool((weight < 0).any())):
        raise ValueError("class weights must be finite and >= 0")


def check_ids(ids: Any, name: str, vocab_size: Optional[int]) -> tuple[int, ...]:
    """An id or a sequence of ids, each in [0, V) (>= 0 when V is not known yet)."""
    values = ids.tolist() if isinstance(ids, Tensor) else ids
    values = [values] if is_int(values) else list(values)
    for value in values:
        if not is_int(value):
            raise TypeError(f"{name} must hold ints, got {type(value).__name__}")
        if not 0 <= value < (vocab_size if vocab_size is not None else value + 1):
            raise ValueError(f"{name} must be in [0, {vocab_size}), got {value}")
    return tuple(int(v) for v in values)


def _check_candidates(value: Any, name: str, lead: tuple[int, ...], N: int, vocab_size: int,
                      per_position: bool, device: torch.device) -> Tensor:
    """include/exclude id lists: (..., K) per row, or (..., N, K) per label position; < 0 = padding."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of ids, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids, got {value.dtype}")
    shapes = [lead + (value.shape[-1],)] if value.dim() else []
    if per_position and value.dim():
        shapes.append(lead + (N, value.shape[-1]))
    if tuple(value.shape) not in [tuple(s) for s in shapes]:
        want = "(..., K) per row" + (" or (..., N, K) per label position" if per_position else "")
        raise ValueError(f"{name} must have shape {want} with the labels' leading shape {lead}, "
                         f"got {tuple(value.shape)}")
    if not tracing() and bool((value >= vocab_size).any()):
        raise ValueError(f"{name} ids must be < {vocab_size} (negative entries are padding), "
                         f"found {int(value.max())}")
    B = math.prod(lead)
    K = value.shape[-1]
    value = value.to(device)
    return value.reshape(B, K) if value.dim() == len(lead) + 1 else value.reshape(B, N, K)


def check_objective(objective: Any) -> list[tuple[float, str]]:
    """A name or a mapping name → non-negative weight, as [(weight, name)]."""
    if isinstance(objective, str):
        members = {objective: 1.0}
    elif isinstance(objective, Mapping):
        members = dict(objective)
        if not members:
            raise ValueError("objective mixture must name at least one objective")
    else:
        raise TypeError(f"objective must be a name or a mapping name -> weight, got {type(objective).__name__}")
    out: list[tuple[float, str]] = []
    for name, weight in members.items():
        if name not in OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool):
            raise TypeError(f"objective weight for {name!r} must be a number, got {type(weight).__name__}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"objective weight for {name!r} must be finite and >= 0, got {weight}")
        out.append((float(weight), name))
    return out


def check_member_options(name: str, options: dict[str, Any], vocab_size: Optional[int],
                         lead: Optional[tuple[int, ...]], N: int,
                         device: Optional[torch.device] = None) -> dict[str, Any]:
    """The options of one objective, checked and normalised (ids as tuples, tensors flattened to B
    and moved to ``device``); with ``lead`` None the candidate lists are not checked."""
    out = dict(options)
    if "first_token_mle" in out and not isinstance(out["first_token_mle"], bool):
        raise TypeError("first_token_mle must be a bool")
    if "exclude_ids" in out:
        out["exclude_ids"] = check_ids(out["exclude_ids"], "exclude_ids", vocab_size)
    if "num_samples" in out:
        if not is_int(out["num_samples"]):
            raise TypeError(f"num_samples must be an int, got {type(out['num_samples']).__name__}")
        if out["num_samples"] < 1:
            raise ValueError(f"num_samples must be >= 1, got {out['num_samples']}")
    if out.get("generator") is not None and not isinstance(out["generator"], torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(out['generator']).__name__}")
    if name == "selective_eos":
        if out.get("eos_token_id") is None:
            raise TypeError("selective_eos needs eos_token_id")
        if not is_int(out["eos_token_id"]):
            raise TypeError(f"eos_token_id must be an int, got {type(out['eos_token_id']).__name__}")
        check_ids(out["eos_token_id"], "eos_token_id", vocab_size)
    if name == "subset" and lead is not None:
        assert vocab_size is not None and device is not None
        include, exclude = out.get("include"), out.get("exclude")
        if (include is None) == (exclude is None):
            raise ValueError("subset_cross_entropy needs exactly one of include= or exclude=")
        if include is not None:
            out["include"] = _check_candidates(include, "include", lead, N, vocab_size, True, device)
        else:
            out["exclude"] = _check_candidates(exclude, "exclude", lead, N, vocab_size, False, device)
    return out


def route_options(objectives: list[tuple[float, str]], options: dict[str, Any], vocab_size: Optional[int],
                  lead: Optional[tuple[int, ...]], N: int, device: Optional[torch.device] = None) -> list[Member]:
    """Give each member of a mixture the options it accepts; an option nobody accepts is an error."""
    unused = set(options)
    members = []
    for weight, name in objectives:
        accepted = OBJECTIVES[name].options
        mine = {k: v for k, v in options.items() if k in accepted}
        unused -= set(mine)
        members.append((weight, name, check_member_options(name, mine, vocab_size, lead, N, device)))
    if unused:
        names = ", ".join(sorted(unused))
        raise TypeError(f"unexpected keyword argument(s) {names} for objective "
                        f"{'+'.join(n for _, n in objectives)}")
    return members
