"""``patch(model, objective, fused, **options)``: the model computes the objective whenever it gets labels.

Each family is intercepted at the one place its loss is computed (see ``families.py``); ``unpatch``
puts back exactly what was there. With ``objective="mle"`` the patched model reproduces its own loss.
"""
from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import functional
from .._validate import check_options
from ..functional import linear_loss
from .families import (
    BLIP,
    CAUSAL,
    SEQ2SEQ,
    check_fusable,
    check_own_softcap,
    family_of,
    fused_loss_options,
    logits_uncapped,
)
from .heads import gathered_in_own_call, linear_head, peft_base_model

_STATE = "_seqloss_patch"
# Set by each family's convention or by the model call, never by the caller.
_RESERVED = ("shift", "num_items_in_batch", "position_ids")
MULTIMODAL_POSITIONS = ("the model was called with multimodal position_ids (one row per rotary section): seqloss "
                        "cannot find packed examples in them and scores each row as one sequence; for packed "
                        "rows pass cu_seq_lens_q (DataCollatorWithFlattening(return_flash_attn_kwargs=True))")
BYPASS = ("TRL's SFTTrainer computes its own loss (a fused log-probability head) and never calls "
          "model.loss_function, so a patched model would train plain NLL under it: build the trainer with "
          "seqloss.hf.sft_trainer(objective, ..., model=..., args=..., train_dataset=...) instead")

TRANSFORMED = ("fused=True cannot follow {name}: its forward changes the LM head's output before the loss (a "
               "scale, a soft-cap or a vocabulary slice seqloss does not know), which the fused loss, computed "
               "from the head's input, would miss; use fused=False")

SMOOTHED = ("transformers.Trainer(label_smoothing_factor=...) takes the labels from the batch and trains its own "
            "label-smoothed NLL on the logits, never the patched objective: set label_smoothing_factor=0 and pass "
            "label_smoothing= to seqloss.hf.patch (it then spreads over the objective's support)")


@torch.compiler.disable
def check_not_bypassed(owner: Any) -> None:
    """Called where a patched forward gets no labels: while training, whether the caller is a
    ``transformers.Trainer`` that took them to compute a loss of its own (its label smoother); a
    ``compute_loss_func`` the Trainer calls instead is the caller's choice. Refused with SMOOTHED."""
    if not (getattr(owner, "training", False) and torch.is_grad_enabled()):
        return
    frame: Optional[types.FrameType] = sys._getframe(1)
    for _ in range(32):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return
        if frame.f_code.co_name == "compute_loss":
            trainer, labels = frame.f_locals.get("self"), frame.f_locals.get("labels")
            if (labels is not None and getattr(trainer, "label_smoother", None) is not None
                    and getattr(trainer, "compute_loss_func", None) is None):
                raise ValueError(SMOOTHED)
            return


def check_loss_options(objective: Any, options: dict[str, Any], vocab_size: Optional[int] = None) -> None:
    """The objective and the options ``patch``, ``compute_loss_func`` and ``sft_trainer`` take:
    those of ``seqloss.objective_loss`` (class weights as ``weight=``), checked before training."""
    if "class_weight" in options:
        raise TypeError("pass class weights as weight= (as seqloss.objective_loss and F.cross_entropy take them)")
    check_options(objective, fused_loss_options(options), vocab_size)


def _check_options(model: Any, objective: Any, options: dict[str, Any]) -> None:
    """Validate the objective and options at patch time, not at the first training step."""
    for key in _RESERVED:
        if key in options:
            raise TypeError(f"{key} is set by the model family's label convention; do not pass it to patch()")
    if options.get("reduction", "mean") not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for a model's loss, got {options['reduction']!r}")
    if options.get("return_stats"):
        raise ValueError("return_stats is for direct calls: a model's loss must be a tensor")
    check_own_softcap(model, options)
    owner = model.text_decoder if family_of(model) == BLIP else model
    check_loss_options(objective, options, vocab_size=owner.get_output_embeddings().weight.shape[0])


def _replaced(out: Any, **changes: Any) -> Any:
    """A copy of a ``ModelOutput`` with some fields changed, in the class's field order (``to_tuple``
    and indexing follow it; setting an attribute on a ModelOutput does not reorder or drop keys)."""
    fields = {**dict(out.items()), **changes}
    return type(out)(**{key: value for key, value in fields.items() if value is not None})


def packed_positions(position_ids: Optional[Tensor], cu_seq_lens: Optional[Tensor], labels: Tensor) -> Optional[Tensor]:
    """The packed examples of a model call as ``position_ids`` shaped like ``labels``: the call's own
    ``position_ids`` (a padding-free collator's), else the example boundaries ``cu_seq_lens_q`` that
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` passes instead (cumulative lengths
    over the flattened batch). None when the call has neither."""
    if position_ids is not None and position_ids.dim() > labels.dim():
        # Multimodal rotary positions (Qwen2-VL's (3, B, N)): image tokens share positions, so they
        # cannot tell where an example starts. Say so rather than guess; cu_seq_lens still can.
        warnings.warn(MULTIMODAL_POSITIONS, UserWarning, stacklevel=2)
        position_ids = None
    if position_ids is not None:
        return position_ids.to(labels.device).expand_as(labels)
    if cu_seq_lens is None:
        return None
    index = torch.arange(labels.numel(), device=labels.device)
    starts = cu_seq_lens.to(labels.device, dtype=torch.long)[:-1]
    is_start = torch.zeros_like(index, dtype=torch.bool).index_fill(0, starts[starts < labels.numel()], True)
    example_start = torch.where(is_start, index, 0).cummax(0).values
    return (index - example_start).view_as(labels)                     # 0, 1, ... within each example


def _causal_loss(objective: Any, options: dict[str, Any], position_ids: Optional[Tensor] = None) -> Callable:
    """A drop-in for transformers' ``ForCausalLMLoss`` (same keywords), given the model call's
    ``position_ids`` (packed examples), if any."""

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, cu_seq_lens_q=None, **_):
        shift = shift_labels is None
        targets = (labels if shift else shift_labels).to(logits.device)
        packed = packed_positions(position_ids, cu_seq_lens_q, targets)
        return functional.objective_loss(logits, targets, objective, shift=shift,
                                         ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                         position_ids=packed, **options)

    return loss_function


def _causal_forward(original_of: Callable, objective: Any, options: dict[str, Any]) -> Callable:
    """The model's forward, with its loss function bound to the call's ``position_ids`` (which
    transformers does not hand to ``loss_function``) for the length of the call."""

    def forward(model, *args, **kwargs):
        original = original_of(model)
        position_ids = kwargs.get("position_ids")
        if kwargs.get("labels") is None:
            check_not_bypassed(model)
        if kwargs.get("labels") is None or position_ids is None:
            return original(*args, **kwargs)
        # Set and put back through __dict__, as the fused forward does (torch.compile replays these).
        previous = model.__dict__.get("_loss_function")
        model.__dict__["_loss_function"] = _causal_loss(objective, options, position_ids)
        try:
            return original(*args, **kwargs)
        finally:
            model.__dict__["_loss_function"] = previous

    return forward


def _fused_causal_forward(model: Any, original_of: Callable, objective: Any, options: dict[str, Any]) -> Callable:
    """The model's forward with the LM head bypassed: its loss comes from the last hidden states and
    the head's weight (seen through PEFT wrappers, see ``heads.py``; the head is looked up at each call,
    so an adapter added after ``patch`` counts)."""
    where = f"{type(model).__name__}.get_output_embeddings()"
    # A model that soft-caps its logits (Gemma 2/3) would cap the hidden states the bypassed head
    # passes through: its cap is switched off for the call and applied inside the fused loss instead.
    loss_options = fused_loss_options(options, model)
    checked: list[bool] = []  # whether a head that computes the loss in its own call was followed once

    def forward(model, *args, labels=None, **kwargs):
        original = original_of(model)
        if labels is None:
            check_not_bypassed(model)
            return original(*args, **kwargs)
        position_ids = kwargs.get("position_ids")
        head = model.get_output_embeddings()
        # An FSDP2 unit of its own, or a head ZeRO-3 partitions, holds its weight whole only inside its own
        # call: the loss is computed there (the hooks gather the weight, and see its gradient flow back).
        in_own_call = gathered_in_own_call(head)
        head_parts = None if in_own_call else linear_head(head, where)
        made: list[Tensor] = []  # what the head's call returned: the loss, or the hidden states passed through

        def loss_of(hidden_in, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
                    cu_seq_lens_q=None):
            parts = head_parts or linear_head(head, where, in_own_call=True)
            hidden, weight, bias = parts(hidden_in)
            shift = shift_labels is None
            targets = (labels if shift else shift_labels).to(hidden.device)
            return linear_loss(hidden, weight, targets, bias=bias, objective=objective, shift=shift,
                               ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                               position_ids=packed_positions(position_ids, cu_seq_lens_q, targets), **loss_options)

        def in_head(hidden):  # the head's forward inside its own call: the loss, not logits
            made.append(loss_of(hidden, labels, kwargs.get("num_items_in_batch"),
                                shift_labels=kwargs.get("shift_labels"), cu_seq_lens_q=kwargs.get("cu_seq_lens_q")))
            return made[-1]

        def pass_through(hidden):
            made.append(hidden)
            return hidden

        def fused_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                       shift_labels=None, cu_seq_lens_q=None, **_):
            if in_own_call:  # the head's call made the loss; the gathering hooks may hand it on wrapped
                if not checked and not torch.compiler.is_compiling():  # so compared by value, once
                    if not (made and logits.shape == made[-1].shape and torch.equal(logits.detach(), made[-1].detach())):
                        raise ValueError(TRANSFORMED.format(name=type(model).__name__))
                    checked.append(True)
                return made[-1]
            if not made or logits is not made[-1]:  # the model changed its head's output before its loss
                raise ValueError(TRANSFORMED.format(name=type(model).__name__))
            # the bypassed head passed its input through: "logits" are the hidden states
            return loss_of(logits, labels, num_items_in_batch, ignore_index, shift_labels, cu_seq_lens_q)

        # Instance attributes set and removed through __dict__ (what nn.Module's setattr does for
        # functions): torch.compile replays these; a `del module.attr` after a set it fails to replay.
        previous = model.__dict__.get("_loss_function")
        head.__dict__["forward"] = in_head if in_own_call else pass_through
        model.__dict__["_loss_function"] = fused_loss   # what transformers' loss_function setter stores
        try:
            with logits_uncapped(model):
                out = original(*args, labels=labels, **kwargs)
        finally:
            head.__dict__.pop("forward", None)
            if previous is None:
                model.__dict__.pop("_loss_function", None)
            else:
                model.__dict__["_loss_function"] = previous
        if isinstance(out, tuple):
            return (out[0], None) + out[2:]  # keep the layout: (loss, logits, ...) with no logits
        return _replaced(out, logits=None)  # its "logits" were hidden states: the fused path makes none

    return forward


def _seq2seq_forward(model: Any, original_of: Callable, objective: Any, options: dict[str, Any]) -> Callable:
    """T5/BART: decoder inputs from the labels as the model makes them (on the device of its input
    embeddings, wherever the labels are), loss position by position."""

    def forward(model, *args, labels=None, return_dict=None, **kwargs):
        original = original_of(model)
        if labels is None:
            check_not_bypassed(model)
            return original(*args, return_dict=return_dict, **kwargs)
        if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            device = model.get_input_embeddings().weight.device
            kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels.to(device))
        out = original(*args, return_dict=True, **kwargs)
        loss = functional.objective_loss(out.logits, labels.to(out.logits.device), objective, shift=False, **options)
        out = _replaced(out, loss=loss)
        return out if return_dict is not False else out.to_tuple()

    return forward


def _blip_decoder_forward(decoder: Any, original_of: Callable, objective: Any, options: dict[str, Any]) -> Callable:
    """BLIP's text decoder: shift inside, its own label smoothing, ``reduction="none"`` = per-caption sums."""

    def forward(decoder, *args, labels=None, reduction="mean", **kwargs):
        original = original_of(decoder)
        if labels is None or kwargs.get("return_logits"):
            if labels is None:
                check_not_bypassed(decoder)
            return original(*args, labels=labels, reduction=reduction, **kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        out = original(*args, labels=None, **kwargs)
        settings = {"label_smoothing": decoder.label_smoothing, **options}
        if reduction == "none":
            settings["reduction"] = "sequence"
        elif reduction != "mean":
            settings["reduction"] = reduction
        shift = shift_labels is None
        targets = (labels if shift else shift_labels).to(out.logits.device)
        return _replaced(out, loss=functional.objective_loss(out.logits, targets, objective, shift=shift,
                                                             **settings))

    return forward


def _install(owner: Any, function: Callable, forward: Callable) -> None:
    """Set ``owner.forward`` to ``forward(owner, ...)`` (which reads ``labels``, ``decoder_input_ids``,
    ... by keyword), called as the class's ``function`` may be: positional arguments are passed by name,
    so that none is missed or given twice.

    It is a method bound to ``owner``, with everything else looked up on the instance at each call: a
    copy of the model (``copy.deepcopy``: TRL's reference model, an EMA copy) is rebound to itself and
    runs its own weights, never the original's."""
    names = [p.name for p in inspect.signature(function).parameters.values()
             if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]  # without self

    @functools.wraps(function)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            if len(args) > len(names):
                raise TypeError(f"{function.__qualname__}() takes {len(names)} positional arguments, "
                                f"got {len(args)}")
            named = dict(zip(names, args))
            clash = sorted(named.keys() & kwargs.keys())
            if clash:
                raise TypeError(f"{function.__qualname__}() got multiple values for argument {clash[0]!r}")
            kwargs = {**named, **kwargs}
        return forward(self, **kwargs)

    owner.forward = types.MethodType(call, owner)


def _original_of(previous_forward: Any, cls: Any) -> Callable:
    """``instance → its forward under the patch``: the forward already set on the instance (TRL's fused
    log-probability head), rebound to the instance it is called for, or the class's."""
    if previous_forward is not None and not isinstance(previous_forward, types.MethodType):
        return lambda instance: previous_forward
    function = cls.forward if previous_forward is None else previous_forward.__func__
    # A closure, not types.MethodType(...): Dynamo traces the one and not the other.
    return lambda instance: lambda *args, **kwargs: function(instance, *args, **kwargs)


def patch(model: Any, objective: Any = "smile", fused: bool = False, **options: Any) -> Any:
    """Make ``model`` train with ``objective`` (a name or a mixture) whenever it is given ``labels``.

    Options are those of ``seqloss.objective_loss`` (``exclude_ids``, ``label_smoothing``, ...);
    the shift and ``num_items_in_batch`` follow the model's family. ``fused=True`` (causal LMs)
    computes the loss from the last hidden states and the LM-head weight without logits; the
    outputs then carry ``logits=None`` (tuples keep their layout: ``(loss, None, ...)``). A PEFT
    model (``get_peft_model``) is patched through its base model, before or after wrapping; with an
    adapter on the LM head, ``fused=True`` computes the adapted head exactly (LoRA, modules_to_save)
    or refuses with a ValueError. Causal LMs hand the call's ``position_ids`` (or the
    ``cu_seq_lens_q`` of a flattening collator) to the loss, so packed examples are scored apart.
    TRL's ``SFTTrainer`` never calls the patched loss: a UserWarning says so when TRL is in use
    (train with ``seqloss.hf.sft_trainer``). Returns ``model`` as passed; ``unpatch`` undoes it.
    """
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
    wrapper, model = model, peft_base_model(model)
    family = family_of(model)
    if fused:
        check_fusable(model, family)
    elif "exact_accumulation" in options:
        raise TypeError("exact_accumulation is an option of the fused head: pass fused=True with it")
    _check_options(model, objective, options)
    unpatch(model)
    # A forward already set on the instance (TRL's fused log-probability head) stays underneath ours.
    previous_forward = model.__dict__.get("forward")
    original_of = _original_of(previous_forward, type(model))
    function = getattr(previous_forward, "__func__", type(model).forward)
    if family == CAUSAL and not fused:
        previous = model.__dict__.get("_loss_function")
        model.loss_function = _causal_loss(objective, options)
        _install(model, function, _causal_forward(original_of, objective, options))
        restore = functools.partial(_restore_causal, model, previous, previous_forward)
    elif family in (CAUSAL, SEQ2SEQ):
        make = _fused_causal_forward if fused else _seq2seq_forward
        _install(model, function, make(model, original_of, objective, options))
        restore = functools.partial(_restore_attribute, model, "forward", previous_forward)
    else:
        decoder = model.text_decoder
        _install(decoder, type(decoder).forward,
                 _blip_decoder_forward(decoder, _original_of(None, type(decoder)), objective, options))
        restore = functools.partial(_restore_attribute, decoder, "forward", None)
    setattr(model, _STATE, dict(family=family, objective=objective, fused=fused, options=dict(options),
                                restore=restore))
    if family == CAUSAL:
        _warn_if_a_trainer_bypasses(previous_forward)
    return wrapper


def _warn_if_a_trainer_bypasses(previous_forward: Any) -> None:
    """TRL's SFTTrainer never calls ``model.loss_function``: say so when TRL is in use (imported, or
    its fused head already on the model), with what to call instead."""
    from_trl = getattr(getattr(previous_forward, "__func__", previous_forward), "__module__", "") or ""
    if from_trl.startswith("trl") or "trl" in sys.modules:
        warnings.warn(BYPASS, UserWarning, stacklevel=3)


def _restore_causal(model: Any, previous_loss: Any, previous_forward: Any) -> None:
    _restore_attribute(model, "_loss_function", previous_loss)
    _restore_attribute(model, "forward", previous_forward)


def _restore_attribute(owner: Any, name: str, previous: Any) -> None:
    if previous is None:
        owner.__dict__.pop(name, None)
    else:
        setattr(owner, name, previous)


def unpatch(model: Any) -> Any:
    """Undo ``patch`` (a no-op on a model that is not patched); returns the model."""
    state = peft_base_model(model).__dict__.pop(_STATE, None)
    if state is not None:
        state["restore"]()
    return model


def patched_objective(model: Any) -> Any:
    """What ``patch`` installed on this model (family, objective, fused, options), or None."""
    state = peft_base_model(model).__dict__.get(_STATE)
    return None if state is None else {k: v for k, v in state.items() if k != "restore"}
