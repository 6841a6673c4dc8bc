"""Target construction for training sequence models on token or item ids (DESIGN §3).

    scheme = seqloss.masking.get("clm" | "mlm" | "plm" | "rtd", padding_idx=0, **options)
    out = scheme(item_ids, mode="train" | "eval" | "infer", generator=None)   # a MaskingOutput

Schemes: causal LM (``CausalLM``), masked LM (``MaskedLM``), XLNet's permutation LM
(``PermutationLM``) and ELECTRA's replacement token detection (``ReplacementTokenDetection``, with
``electra_loss``). Each class documents which position predicts which item. ``DataCollator`` runs
a scheme as a ``transformers``-style collator (padding, ``labels``, ``transformers.Trainer``).
"""
from __future__ import annotations

from .clm import CausalLM
from .collator import DataCollator
from .common import IGNORE_INDEX, MODES, MaskingOutput, MaskingScheme
from .mlm import MaskedLM, MaskEmbedding
from .plm import PermutationLM
from .registry import SCHEMES, get
from .rtd import ReplacementTokenDetection, electra_loss

__all__ = [
    "get", "SCHEMES", "MODES", "IGNORE_INDEX", "MaskingOutput", "MaskingScheme", "MaskEmbedding", "electra_loss",
    "CausalLM", "MaskedLM", "PermutationLM", "ReplacementTokenDetection", "DataCollator",
]
