"""Every input check, once, before any branch. Three entries, one per kind of call:
``check_logits_call`` (the functions on logits and their modules), ``check_linear_call``
(the fused head) and ``check_options`` (an objective and its options alone: ``seqloss.hf`` at
patch time, the modules when constructed). ``sampled_softmax_loss`` adds its own options on top of
the common checks in ``_validate_sampled``.

Errors name the argument: a ``TypeError`` for a wrong kind of thing, a ``ValueError`` for a wrong
value. Checks never modify their inputs; the normalised values they return are new objects. Tensors
that come with the labels (labels, ``position_ids``, ``token_weights``, class weights, candidate
lists) are moved to the scores' device, as Hugging Face's ``ForCausalLMLoss`` moves labels; the head
(``weight``, ``bias``) must already be on the hidden states' device.

Checks that read tensor values (label range, candidate ids, weights, ``num_items_in_batch``) run in
eager mode only: under ``torch.compile`` they would need the data on the host mid-graph, which breaks
``fullgraph=True``; shapes, dtypes and option values are still checked while tracing.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from ._validate_parallel import check_context_parallel, check_kind, local, local_labels, shard_of
from ._validate_values import check_num_items, check_softmax, is_int, is_real, tracing
from .call import Call, Common, CommonOptions, Member
from .support import OBJECTIVES

REDUCTIONS = ("mean", "sum", "none", "sequence")
IMPLS = ("auto", "reference", "torch", "triton")
# The common keywords, as the validator takes them: the typed ones, class weights (the logits functions
# pass their weight= as class_weight), return_stats and the fused head's exact_accumulation.
COMMON_KEYS = (*CommonOptions.__annotations__, "class_weight", "return_stats", "exact_accumulation")


# --- the three entries ---------------------------------------------------------------------------


def check_options(objective: Any, options: Mapping[str, Any], vocab_size: Optional[int] = None) -> None:
    """An objective and its options without tensors to score: ids checked against ``vocab_size``
    when given; per-call candidate lists (``include``/``exclude``) are left to the call."""
    common = check_common({k: v for k, v in options.items() if k in COMMON_KEYS})
    if common.class_weight is not None and vocab_size is not None:
        check_class_weight(common.class_weight, vocab_size)
    others = {k: v for k, v in options.items() if k not in COMMON_KEYS and k not in ("include", "exclude")}
    route_options(check_objective(objective), others, vocab_size, None, 0)


def check_logits_call(objective: Any, options: Mapping[str, Any], logits: Any, labels: Any) -> Call:
    """A call on logits (..., N, V) with labels (..., N); on a vocabulary shard (a DTensor or the
    ``vocab_parallel`` keyword), logits (..., N, V / ranks) and the whole vocabulary's labels."""
    if "exact_accumulation" in options:
        raise TypeError("exact_accumulation is an option of the fused head (linear_loss and its kin): "
                        "the logits functions accumulate nothing")
    logits, shard = shard_of(logits, -1, "logits", options.get("vocab_parallel"))
    check_scores(logits, "logits", "V", empty_ok=shard is not None)
    vocab = logits.shape[-1] if shard is None else shard.vocab_size
    return _call(objective, {**options, "vocab_parallel": shard}, logits, vocab, local_labels(labels), "logits")


def check_linear_call(objective: Any, options: Mapping[str, Any], hidden: Any, weight: Any, bias: Any,
                      labels: Any) -> Call:
    """A fused-head call: hidden (..., N, H), weight (V, H), bias (V,) or None, labels (..., N); on a
    vocabulary shard, the weight's (and bias') rows are this rank's slice."""
    weight, shard = shard_of(weight, 0, "weight", options.get("vocab_parallel"))
    hidden, bias = local(hidden), local(bias)
    check_head(hidden, weight, bias, empty_ok=shard is not None)
    vocab = weight.shape[0] if shard is None else shard.vocab_size
    return _call(objective, {**options, "vocab_parallel": shard}, hidden, vocab, local_labels(labels), "hidden")


def _call(objective: Any, options: Mapping[str, Any], scores: Tensor, vocab: int, labels: Any, against: str) -> Call:
    common = check_common({k: v for k, v in options.items() if k in COMMON_KEYS})
    others = {k: v for k, v in options.items() if k not in COMMON_KEYS}
    objectives = check_objective(objective)
    *lead_list, N = scores.shape[:-1]
    lead = tuple(lead_list)
    context = check_context_parallel(common.context_parallel, labels, N, against)
    if context is not None:  # the scores hold some positions; the labels are whole
        N = labels.shape[-1]
        common = dataclasses.replace(common, context_parallel=context)
    flat = check_labels(labels, (*lead, N), vocab, common.ignore_index, scores.device, against)
    members = route_options(objectives, others, vocab, lead, N, scores.device)
    return Call(place_tensors(common, flat.shape, tuple(labels.shape), vocab, scores.device), members, flat, lead, N,
                vocab)


# --- the common keywords -------------------------------------------------------------------------


def check_common(options: Mapping[str, Any]) -> Common:
    """The common keywords → ``Common`` (tensors still as given: see ``place_tensors``)."""
    o = dict(options)
    shift, turns, return_stats = o.get("shift", False), o.get("turns", False), o.get("return_stats", False)
    exact = o.get("exact_accumulation", False)
    for name, value in (("shift", shift), ("turns", turns), ("return_stats", return_stats),
                        ("exact_accumulation", exact)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    ignore_index = o.get("ignore_index", -100)
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    reduction, impl = o.get("reduction", "mean"), o.get("impl", "auto")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    for name in ("position_ids", "class_weight", "token_weights"):
        if o.get(name) is not None and not isinstance(o[name], Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(o[name]).__name__}")
    softmax = check_softmax(o, weighted=o.get("class_weight") is not None)
    check_kind(o)
    return Common(shift=shift, ignore_index=int(ignore_index), reduction=reduction,
                  num_items_in_batch=check_num_items(o.get("num_items_in_batch")), impl=impl,
                  position_ids=o.get("position_ids"), turns=turns, class_weight=o.get("class_weight"),
                  token_weights=o.get("token_weights"), return_stats=return_stats, softmax=softmax,
                  vocab_parallel=o.get("vocab_parallel"), context_parallel=o.get("context_parallel"),
                  exact_accumulation=exact)


def place_tensors(c: Common, flat: torch.Size, labels_shape: tuple[int, ...], vocab: int,
                  device: torch.device) -> Common:
    """The per-call tensors of ``c`` checked against the labels, moved to ``device`` and flattened
    like the labels (B, N); class weights fp32."""
    changes: dict[str, Any] = {}
    if c.position_ids is not None:
        ids = c.position_ids
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"position_ids must hold integer positions (torch.long), got {ids.dtype}")
        _check_shape(ids, "position_ids", labels_shape)
        if tracing() and c.reduction == "sequence":
            raise ValueError("reduction='sequence' with position_ids returns one sum per packed example, a "
                             "data-dependent shape that torch.compile cannot trace; use reduction='none'")
        ids = moved(ids, "position_ids", device)
        if not tracing() and bool((ids < 0).any()):
            raise ValueError(f"position_ids must be >= 0 (0 marks where a packed example starts), "
                             f"found {int(ids.min())}")
        changes["position_ids"] = ids.reshape(flat)
    if c.token_weights is not None:
        weights = c.token_weights
        if not weights.is_floating_point():
            raise TypeError(f"token_weights must be floating point, one weight per label, got {weights.dtype}")
        _check_shape(weights, "token_weights", labels_shape)
        weights = moved(weights, "token_weights", device).float()
        if not tracing() and (not bool(torch.isfinite(weights).all()) or bool((weights < 0).any())):
            raise ValueError("token_weights must be finite and >= 0")
        changes["token_weights"] = weights.reshape(flat)
    if c.class_weight is not None:
        check_class_weight(c.class_weight, vocab)
        changes["class_weight"] = moved(c.class_weight, "class weights", device).float()
    return dataclasses.replace(c, **changes)


def _check_shape(tensor: Tensor, name: str, labels_shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != labels_shape:
        raise ValueError(f"{name} shape {tuple(tensor.shape)} does not match the labels' {labels_shape}")


def moved(tensor: Tensor, name: str, device: torch.device) -> Tensor:
    """A tensor that comes with the labels, on the scores' device (a copy if it was elsewhere)."""
    if tensor.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{name} is on the meta device (it holds no values); pass it on {device}")
    return tensor.to(device)


def check_class_weight(weight: Tensor, vocab_size: int) -> None:
    """Class weights: (V,) floating point, finite, >= 0 (torch's ``cross_entropy(weight=...)``)."""
    if not weight.is_floating_point() or tuple(weight.shape) != (vocab_size,):
        raise ValueError(f"class weights must be a floating-point tensor of shape ({vocab_size},), one per id, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if weight.device.type != "meta" and not tracing() and (
            not bool(torch.isfinite(weight).all()) or bool((weight < 0).any())):
        raise ValueError("class weights must be finite and >= 0")


# --- the tensors a call scores ---------------------------------------------------------------------


def check_scores(scores: Any, name: str, last: str, empty_ok: bool = False) -> None:
    """Logits (..., N, V) or hidden states (..., N, H): a floating-point tensor with values (a
    vocabulary shard, ``empty_ok``, may hold no ids)."""
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be floating point (fp32, bf16 or fp16), got {scores.dtype}")
    if scores.dim() < 2:
        raise ValueError(f"{name} must have shape (..., N, {last}), got {tuple(scores.shape)}")
    if scores.shape[-1] < 1 and not empty_ok:
        raise ValueError(f"{name} must have a last dimension {last} >= 1, got {tuple(scores.shape)}")
    if scores.device.type == "meta":
        raise ValueError(f"{name} are on the meta device: they hold no values to compute a loss from")


def check_head(hidden: Any, weight: Any, bias: Any, empty_ok: bool = False) -> None:
    """The fused head: hidden (..., N, H), weight (V, H), bias (V,) or None, floating point, on one
    device (a vocabulary shard, ``empty_ok``, may hold no rows).

    Dtypes may differ (a bf16 hidden with an fp32 weight, the usual mixed-precision set-up): the
    head then runs in autocast's dtype under autocast, else in the widest of the three.
    """
    check_scores(hidden, "hidden", "H")
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight width {weight.shape[1]} does not match hidden width {hidden.shape[-1]}: "
                         f"weight must be (V, H) like nn.Linear / lm_head.weight")
    if weight.shape[0] < 1 and not empty_ok:
        raise ValueError("weight must have at least one row (V >= 1)")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}: the head must be on "
                         f"the hidden states' device")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}: the head must be on "
                             f"the hidden states' device")


def check_labels(labels: Any, expected_shape: Sequence[int], vocab_size: int, ignore_index: int,
                 device: torch.device, against: str = "logits") -> Tensor:
    """Integer labels of the expected shape in [0, V) or ``ignore_index`` → (B, N) on ``device``."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must hold integer ids (torch.long), got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {against}: expected "
                         f"{tuple(expected_shape)}")
    labels = moved(labels, "labels", device)
    if not tracing():
        bad = (labels.clamp(0, vocab_size - 1) != labels) & (labels != ignore_index)
        if bool(bad.any()):
            value = int(labels[bad].flatten()[0])
            raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; found {value}")
    return labels.reshape(math.prod(expected_shape[:-1]), expected_shape[-1])


# --- objectives and their own options ----------------------------------------------------------------


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
    value = moved(value, name, device)
    if not tracing() and bool((value >= vocab_size).any()):
        raise ValueError(f"{name} ids must be < {vocab_size} (negative entries are padding), "
                         f"found {int(value.max())}")
    B, K = math.prod(lead), value.shape[-1]
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
        if not is_real(weight):
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
                  lead: Optional[tuple[int, ...]], N: int,
                  device: Optional[torch.device] = None) -> tuple[Member, ...]:
    """Give each member of a mixture the options it accepts; an option nobody accepts is an error."""
    unused = set(options)
    members = []
    for weight, name in objectives:
        accepted = OBJECTIVES[name].options
        mine = {k: v for k, v in options.items() if k in accepted}
        unused -= set(mine)
        members.append(Member(weight, name, check_member_options(name, mine, vocab_size, lead, N, device)))
    if unused:
        names = ", ".join(sorted(unused))
        raise TypeError(f"unexpected keyword argument(s) {names} for objective "
                        f"{'+'.join(n for _, n in objectives)}")
    return tuple(members)
