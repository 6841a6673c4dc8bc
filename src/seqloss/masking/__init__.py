"""Target construction for training sequence models on token or item ids (DESIGN §3).

    scheme = seqloss.masking.get("clm" | "mlm" | "plm" | "rtd", padding_idx=0, **options)
    out = scheme(item_ids, mode="train" | "eval" | "infer", generator=None)   # a MaskingOutput

Schemes: causal LM (``CausalLM``), masked LM (``MaskedLM``), XLNet's permutation LM
(``PermutationLM``) and ELECTRA's replacement token detection (``ReplacementTokenDetection``, with
``electra_loss``). Each class documents which position predicts which item.
"""
from __future__ import annotations

import inspect
from typing import Any

from .clm import CausalLM
from .common import IGNORE_INDEX, MODES, MaskingOutput, MaskingScheme, check_options
from .mlm import MaskedLM, MaskEmbedding
from .plm import PermutationLM
from .rtd import ReplacementTokenDetection, electra_loss

SCHEMES: dict[str, type[MaskingScheme]] = {
    "clm": CausalLM, "causal": CausalLM,
    "mlm": MaskedLM, "masked": MaskedLM,
    "plm": PermutationLM, "permutation": PermutationLM,
    "rtd": ReplacementTokenDetection, "replacement": ReplacementTokenDetection,
}


def get(name: str, padding_idx: int = 0, **options: Any) -> MaskingScheme:
    """The masking scheme called ``name`` ("clm"/"causal", "mlm"/"masked", "plm"/"permutation",
    "rtd"/"replacement"), configured with ``options`` (the keyword arguments of its class; an
    option another scheme takes is an error here, not silently ignored)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name.lower() not in SCHEMES:
        raise ValueError(f"unknown masking scheme {name!r}; choose one of {sorted(SCHEMES)}")
    cls = SCHEMES[name.lower()]
    accepted = [p for p in inspect.signature(cls).parameters if p != "padding_idx"]
    check_options(cls.name, options, accepted)
    return cls(padding_idx=padding_idx, **options)


__all__ = [
    "get", "SCHEMES", "MODES", "IGNORE_INDEX", "MaskingOutput", "MaskingScheme", "MaskEmbedding", "electra_loss",
    "CausalLM", "MaskedLM", "PermutationLM", "ReplacementTokenDetection",
]
