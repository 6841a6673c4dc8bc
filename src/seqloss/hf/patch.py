"""``patch(model, objective, fused, **options)``: the model computes the objective whenever it gets labels.

Each family is intercepted at the one place its loss is computed (see ``families.py``); ``unpatch``
puts back exactly what was there. With ``objective="mle"`` the patched model reproduces its own loss.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict

from .. import functional
from .._validate import COMMON_DEFAULTS, check_common, check_objective, route_options
from ..linear import linear_loss
from .families import BLIP, CAUSAL, SEQ2SEQ, check_fusable, family_of

_STATE = "_seqloss_patch"
_RESERVED = ("shift", "num_items_in_batch")  # set by each family's convention, never by the caller


def _check_options(model: Any, objective: Any, options: Dict[str, Any]) -> None:
    """Validate the objective and options at patch time, not at the first training step."""
    for key in _RESERVED:
        if key in options:
            raise TypeError(f"{key} is set by the model family's label convention; do not pass it to patch()")
    if options.get("reduction", "mean") not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for a model's loss, got {options['reduction']!r}")
    check_common({k: v for k, v in options.items() if k in COMMON_DEFAULTS})
    owner = model.text_decoder if family_of(model) == BLIP else model
    vocab_size = owner.get_output_embeddings().weight.shape[0]
    others = {k: v for k, v in options.items() if k not in COMMON_DEFAULTS and k not in ("include", "exclude")}
    route_options(check_objective(objective), others, vocab_size, (1,), 1)


def _replaced(out: Any, **changes: Any) -> Any:
    """A copy of a ``ModelOutput`` with some fields changed, in the class's field order (``to_tuple``
    and indexing follow it; setting an attribute on a ModelOutput does not reorder or drop keys)."""
    fields = {**dict(out.items()), **changes}
    return type(out)(**{key: value for key, value in fields.items() if value is not None})


def _causal_loss(objective: Any, options: Dict[str, Any]) -> Callable:
    """A drop-in for transformers' ``ForCausalLMLoss`` (same keywords)."""

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                      shift_labels=None, **_):
        shift = shift_labels is None
        return functional.objective_loss(logits, labels if shift else shift_labels, objective, shift=shift,
                                         ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                         **options)

    return loss_function


def _fused_causal_forward(model: Any, original: Callable, objective: Any, options: Dict[str, Any]) -> Callable:
    """The model's forward with the LM head bypassed: its loss comes from the last hidden states."""
    head = model.get_output_embeddings()

    def fused_loss(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=-100,
                   shift_labels=None, **_):
        hidden = logits  # the bypassed head passed the hidden states through
        shift = shift_labels is None
        return linear_loss(hidden, head.weight, labels if shift else shift_labels, bias=head.bias,
                           objective=objective, shift=shift, ignore_index=ignore_index,
                           num_items_in_batch=num_items_in_batch, **options)

    @functools.wraps(original)
    def forward(*args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        previous = model.__dict__.get("_loss_function")
        head.forward = lambda hidden: hidden
        model.loss_function = fused_loss
        try:
            out = original(*args, labels=labels, **kwargs)
        finally:
            del head.forward
            if previous is None:
                del model._loss_function
            else:
                model._loss_function = previous
        if isinstance(out, tuple):
            return (out[0],) + out[2:]
        return _replaced(out, logits=None)  # its "logits" were hidden states: the fused path makes none

    return forward


def _seq2seq_forward(model: Any, original: Callable, objective: Any, options: Dict[str, Any]) -> Callable:
    """T5/BART: decoder inputs from the labels as the model makes them, loss position by position."""

    @functools.wraps(original)
    def forward(*args, labels=None, return_dict=None, **kwargs):
        if labels is None:
            return original(*args, return_dict=return_dict, **kwargs)
        if kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
            kwargs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        out = original(*args, return_dict=True, **kwargs)
        out = _replaced(out, loss=functional.objective_loss(out.logits, labels, objective, shift=False, **options))
        return out if return_dict is not False else out.to_tuple()

    return forward


def _blip_decoder_forward(decoder: Any, original: Callable, objective: Any, options: Dict[str, Any]) -> Callable:
    """BLIP's text decoder: shift inside, its own label smoothing, ``reduction="none"`` = per-caption sums."""

    @functools.wraps(original)
    def forward(*args, labels=None, reduction="mean", **kwargs):
        if labels is None or kwargs.get("return_logits"):
            return original(*args, labels=labels, reduction=reduction, **kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        out = original(*args, labels=None, **kwargs)
        settings = {"label_smoothing": decoder.label_smoothing, **options}
        if reduction == "none":
            settings["reduction"] = "sequence"
        elif reduction != "mean":
            settings["reduction"] = reduction
        shift = shift_labels is None
        return _replaced(out, loss=functional.objective_loss(out.logits, labels if shift else shift_labels,
                                                             objective, shift=shift, **settings))

    return forward


def patch(model: Any, objective: Any = "smile", fused: bool = False, **options: Any) -> Any:
    """Make ``model`` train with ``objective`` (a name or a mixture) whenever it is given ``labels``.

    Options are those of :func:`seqloss.objective_loss` (``exclude_ids``, ``label_smoothing``, ...);
    the shift and ``num_items_in_batch`` follow the model's family. ``fused=True`` (causal LMs)
    computes the loss from the last hidden states and the LM-head weight without logits; the
    outputs then carry ``logits=None``. Returns the model; :func:`unpatch` undoes it.
    """
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
    family = family_of(model)
    if fused:
        check_fusable(model, family)
    _check_options(model, objective, options)
    unpatch(model)
    if family == CAUSAL and not fused:
        previous = model.__dict__.get("_loss_function")
        model.loss_function = _causal_loss(objective, options)
        restore = functools.partial(_restore_attribute, model, "_loss_function", previous)
    elif family in (CAUSAL, SEQ2SEQ):
        make = _fused_causal_forward if fused else _seq2seq_forward
        model.forward = make(model, type(model).forward.__get__(model), objective, options)
        restore = functools.partial(_restore_attribute, model, "forward", None)
    else:
        decoder = model.text_decoder
        decoder.forward = _blip_decoder_forward(decoder, type(decoder).forward.__get__(decoder), objective, options)
        restore = functools.partial(_restore_attribute, decoder, "forward", None)
    setattr(model, _STATE, dict(family=family, objective=objective, fused=fused, options=dict(options),
                                restore=restore))
    return model


def _restore_attribute(owner: Any, name: str, previous: Any) -> None:
    if previous is None:
        owner.__dict__.pop(name, None)
    else:
        setattr(owner, name, previous)


def unpatch(model: Any) -> Any:
    """Undo :func:`patch` (a no-op on a model that is not patched); returns the model."""
    state = model.__dict__.pop(_STATE, None)
    if state is not None:
        state["restore"]()
    return model


def patched_objective(model: Any) -> Any:
    """What ``patch`` installed on this model (family, objective, fused, options), or None."""
    state = model.__dict__.get(_STATE)
    return None if state is None else {k: v for k, v in state.items() if k != "restore"}
