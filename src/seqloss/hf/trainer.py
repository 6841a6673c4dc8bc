"""``compute_loss_func`` for ``transformers.Trainer(compute_loss_func=...)``."""
from __future__ import annotations

from typing import Any, Callable

from .. import functional
from .patching import check_loss_options


def compute_loss_func(objective: Any = "smile", *, shift: bool = True, **options: Any) -> Callable:
    """A ``compute_loss_func(outputs, labels, num_items_in_batch=None)`` for ``transformers.Trainer``.

    The Trainer pops ``labels`` from the batch, runs the model without them and hands its outputs
    here, with ``num_items_in_batch`` = the supervised tokens of the whole accumulated batch, so
    that gradient accumulation over micro-batches equals one big batch. ``shift=True`` is the
    causal-LM convention; pass ``shift=False`` for seq2seq models (T5, BART). The Trainer hands it no
    inputs, so packed batches (``position_ids``) cannot reach it: train those with ``patch``, and
    TRL's ``SFTTrainer`` with ``seqloss.hf.sft_trainer``.
    """
    check_loss_options(objective, {"shift": shift, **options})

    def loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return functional.objective_loss(logits, labels.to(logits.device), objective, shift=shift,
                                         num_items_in_batch=num_items_in_batch, **options)

    return loss
