"""Model families and their label conventions.

| family | how the loss is reached | labels |
|---|---|---|
| causal LM (GPT-2, Llama, LLaVA-style: any decoder-only model whose forward calls ``self.loss_function``) | ``model.loss_function`` | unshifted; shift inside (``shift=True``) |
| seq2seq (T5, BART: ``config.is_encoder_decoder`` with ``prepare_decoder_input_ids_from_labels``) | ``model.forward`` wrapped | pre-aligned with the decoder outputs (``shift=False``) |
| BLIP captioner (``BlipForConditionalGeneration``) | ``model.text_decoder.forward`` wrapped | unshifted; shift inside; the decoder's own ``label_smoothing`` (``text_config.label_smoothing``; the original BLIP trains with 0.1) unless the call overrides it; ``reduction="mean"`` as BLIP passes it, ``"none"`` → per-caption sums |
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

from .heads import linear_head

CAUSAL, SEQ2SEQ, BLIP = "causal", "seq2seq", "blip"

# Config attributes that transform the LM head's output: the fused path (hidden @ W.T) would differ.
# Soft-capping (Gemma 2/3's final_logit_softcapping) is not among them: the fused loss caps itself.
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale")
SOFTCAP = "final_logit_softcapping"


def _configs(model: Any) -> tuple[Any, Any]:
    """The model's config and its text model's (``config.get_text_config()``: PaliGemma, Gemma 3n/4 for
    conditional generation keep the head's settings there; a text model's is its own config)."""
    config = getattr(model, "config", None)
    return config, getattr(config, "get_text_config", lambda: None)()


def _softcap_config(model: Any) -> Any:
    """The config that holds the model's logit soft-cap (see ``_configs``), or None."""
    return next((c for c in _configs(model) if getattr(c, SOFTCAP, None) is not None), None)


def logit_softcap(model: Any) -> Any:
    """The model's own logit soft-cap c (logits = c·tanh(z / c) after the head), or None."""
    return getattr(_softcap_config(model), SOFTCAP, None)


def check_own_softcap(model: Any, options: dict[str, Any]) -> None:
    """A model that soft-caps its logits itself takes no ``softcap`` option as well."""
    if options.get("softcap") is not None and logit_softcap(model) is not None:
        raise ValueError(f"{type(model).__name__} soft-caps its logits itself (config.{SOFTCAP}="
                         f"{logit_softcap(model)}); do not pass softcap to patch() as well")


def fused_loss_options(options: dict[str, Any], model: Any = None) -> dict[str, Any]:
    """``objective_loss``'s options as ``linear_loss`` takes them: class weights as ``class_weight``
    (its ``weight`` is the head), and the soft-cap of a ``model`` that caps its logits itself (the
    fused loss applies it; see ``logits_capped_by``)."""
    out = {("class_weight" if key == "weight" else key): value for key, value in options.items()}
    cap = None if model is None else logit_softcap(model)
    return out if cap is None else {**out, "softcap": float(cap)}


@contextlib.contextmanager
def logits_uncapped(model: Any) -> Iterator[None]:
    """Switch the model's own logit soft-cap off for the length of a call (a model without one is
    left as it is), so that the hidden states a bypassed head passes through are not capped."""
    config = _softcap_config(model)
    if config is None:
        yield
        return
    previous = getattr(config, SOFTCAP)
    setattr(config, SOFTCAP, None)
    try:
        yield
    finally:
        setattr(config, SOFTCAP, previous)


def _calls_loss_function(cls: Any) -> bool:
    """Whether the class's forward computes its loss through ``self.loss_function``."""
    try:
        return "self.loss_function(" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def family_of(model: Any) -> str:
    """The family whose convention ``patch`` follows for this model, or a TypeError naming its class."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name == "BlipForConditionalGeneration" and hasattr(model, "text_decoder"):
        return BLIP
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "prepare_decoder_input_ids_from_labels"):
        return SEQ2SEQ
    if not getattr(config, "is_encoder_decoder", False) and _calls_loss_function(type(model)):
        return CAUSAL
    raise TypeError(f"seqloss.hf.patch does not know how {name} computes its loss: supported are decoder-only "
                    f"models whose forward calls self.loss_function (GPT-2, Llama, LLaVA-style, ...), "
                    f"encoder-decoder *ForConditionalGeneration models (T5, BART) and "
                    f"BlipForConditionalGeneration")


def check_fusable(model: Any, family: str) -> None:
    """fused=True needs logits = hidden @ lm_head.weight.T (+ bias), nothing after the head."""
    name = type(model).__name__
    if family != CAUSAL:
        raise ValueError(f"fused=True is for causal LMs; {name} is a {family} model (use fused=False)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"fused=True needs a linear LM head; {name}.get_output_embeddings() is None")
    linear_head(head, f"{name}.get_output_embeddings()")  # refuses what it cannot reproduce exactly
    for attribute, value in ((a, getattr(c, a, None)) for a in _LOGIT_TRANSFORMS for c in _configs(model)):
        if value not in (None, 1, 1.0):
            raise ValueError(f"fused=True cannot follow {name}: its config sets {attribute}={value}, which "
                             f"transforms the logits after the LM head (use fused=False)")
