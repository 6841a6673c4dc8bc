"""Hugging Face drop-in: ``patch(model, objective)``, ``compute_loss_func(objective)`` and, for TRL,
``sft_trainer(objective, **SFTTrainer kwargs)``.

Transformers is an optional extra (``pip install seqloss[hf]``); this module only touches model
objects handed to it, so importing it does not import transformers (nor peft: a ``PeftModel`` is
patched through its base model, and ``heads.py`` sees through PEFT wrappers on the LM head).
"""
from .families import family_of
from .patching import patch, patched_objective, unpatch
from .sft import sft_trainer
from .trainer import compute_loss_func

__all__ = ["patch", "unpatch", "patched_objective", "compute_loss_func", "sft_trainer", "family_of"]
