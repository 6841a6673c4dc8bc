"""The schemes by name: ``get("clm" | "mlm" | "plm" | "rtd", padding_idx=0, **options)``."""
from __future__ import annotations

import inspect
from typing import Any

from .clm import CausalLM
from .common import MaskingScheme, check_options
from .mlm import MaskedLM
from .plm import PermutationLM
from .rtd import ReplacementTokenDetection

SCHEMES: dict[str, type[MaskingScheme]] = {
    "clm": CausalLM, "causal": CausalLM,
    "mlm": MaskedLM, "masked": MaskedLM,
    "plm": PermutationLM, "permutation": PermutationLM,
    "rtd": ReplacementTokenDetection, "replacement": ReplacementTokenDetection,
}
"""Scheme names (and their long aliases) → classes, as ``get`` takes them."""


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
