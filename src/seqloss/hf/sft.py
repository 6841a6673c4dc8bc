"""TRL's ``SFTTrainer`` training a seqloss objective: ``sft_trainer(objective, ..., **SFTTrainer kwargs)``.

TRL's ``SFTTrainer`` computes its own loss — a fused log-probability head, plain NLL — and never calls
``model.loss_function``, so ``seqloss.hf.patch`` alone would be bypassed without a word; its
``compute_loss_func=`` hook (deprecated in TRL 1.x) gets no ``position_ids``, so packed and
padding-free batches would mix their examples' SMILE sets. ``sft_trainer`` builds the
``SFTTrainer`` (its datasets, collators, packing, PEFT) and then trains through the patched model:
the loss is the model's own, as ``transformers.Trainer`` computes it, with the call's
``position_ids`` and ``num_items_in_batch`` handed to the objective.
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import Any, Optional

from .patching import BYPASS, check_loss_options, patch


def sft_trainer(objective: Any = "smile", *, fused: bool = False, loss_options: Optional[dict[str, Any]] = None,
                **trainer_kwargs: Any) -> Any:
    """A ``trl.SFTTrainer`` (built from ``trainer_kwargs``: ``model``, ``args``, ``train_dataset``, ...)
    whose training loss is ``objective`` — a name or a mixture such as ``{"mle": 0.01, "smile": 0.99}``.

    ``fused`` and ``loss_options`` (``exclude_ids``, ``turns``, ``label_smoothing``, ...) are those of
    ``seqloss.hf.patch``, applied to the trainer's model once TRL has built it. Completion-only
    labels, packing and padding-free batches work as in TRL; packed examples are scored separately.
    TRL's entropy and token-accuracy metrics, which come from its own loss head, are not logged.
    Refuses ``compute_loss_func`` (it would replace the objective) and ``label_smoothing_factor`` in
    the args (pass ``label_smoothing`` in ``loss_options``: it then spreads over the objective's support).
    """
    options = dict(loss_options or {})
    check_loss_options(objective, options)
    if trainer_kwargs.get("compute_loss_func") is not None:
        raise ValueError("sft_trainer trains the objective it is given; compute_loss_func would replace it")
    args = trainer_kwargs.get("args")
    if getattr(args, "label_smoothing_factor", 0) > 0:
        raise ValueError("label_smoothing_factor in the trainer args would bypass the objective; pass "
                         "loss_options={'label_smoothing': ...} instead")
    return _trainer_class()(trainer_kwargs, objective, fused, options)


@functools.cache
def _trainer_class() -> type:
    try:
        import transformers
        import trl
    except ImportError as error:  # pragma: no cover - exercised only without TRL
        raise ImportError("seqloss.hf.sft_trainer needs TRL: pip install trl") from error

    class SeqlossSFTTrainer(trl.SFTTrainer):
        """``trl.SFTTrainer`` whose loss is the patched model's (see ``sft_trainer``)."""

        def __init__(self, trainer_kwargs: dict[str, Any], objective: Any, fused: bool,
                     options: dict[str, Any]) -> None:
            super().__init__(**trainer_kwargs)
            with warnings.catch_warnings():  # patch's warning about TRL is what this class answers
                warnings.filterwarnings("ignore", message=re.escape(BYPASS[:40]))
                patch(self.model, objective, fused, **options)

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            # As TRL calls the model: no cache, so that transformers masks attention per packed example.
            inputs = {**inputs, "use_cache": False}
            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                                     num_items_in_batch=num_items_in_batch)

    return SeqlossSFTTrainer
