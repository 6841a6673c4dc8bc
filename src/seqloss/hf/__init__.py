"""Hugging Face drop-in: ``patch(model, objective)`` and ``compute_loss_func(objective)``.

Transformers is an optional extra (``pip install seqloss[hf]``); this module only touches model
objects handed to it, so importing it does not import transformers (nor peft: a ``PeftModel`` is
patched through its base model, and ``heads.py`` sees through PEFT wrappers on the LM head).
"""
from .families import family_of
from .patch import patch, patched_objective, unpatch
from .trainer import compute_loss_func

__all__ = ["patch", "unpatch", "patched_objective", "compute_loss_func", "family_of"]
