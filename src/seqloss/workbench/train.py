"""Training on ``transformers.Trainer`` with the loss from ``seqloss.hf.patch``.

Because the Trainer drives the loop, ``accelerate launch`` / ``torchrun`` scale it (gloo on CPU),
and progress bars, checkpoints and ``--resume`` come from there.
"""
from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import transformers

from .. import hf
from .grounding import GroundedTrainer, token_cells, word_cells
from .model import Captioner
from .objectives import check, loss_options, row_candidates
from .scenes import Scene
from .settings import TrainSettings
from .tokenizer import end_of_caption_id


class CaptionPairs(torch.utils.data.Dataset):
    """Every (image, caption) pair: an image with five captions gives five training examples.

    Pixels are computed once up front (the images are small), captions are tokenised per batch. With
    ``scenes`` (one per image) each caption also carries its words' grounding targets
    (``grounding.word_cells``: which image token each word is about); without, ``None``.
    """

    def __init__(self, captioner: Captioner, images: Sequence[Any], captions: Sequence[Sequence[str]],
                 scenes: Optional[Sequence[Scene]] = None, target_words: str = "position") -> None:
        self.pixels = captioner.pixels(images) if len(images) else torch.empty(0)
        self.pairs: list[tuple[int, str]] = [(i, c) for i, cs in enumerate(captions) for c in cs]
        self.cells: list[Optional[list[int]]] = (
            [None] * len(self.pairs) if scenes is None
            else [word_cells(c, scenes[i], target_words) for i, c in self.pairs])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, Optional[list[int]]]:
        image, caption = self.pairs[index]
        return self.pixels[image], caption, self.cells[index]


class CaptionCollator:
    """(pixels, caption, word targets or None) items → a BLIP training batch; ``cell_targets`` (B, N)
    is added when some caption of the batch has grounding targets (``GroundedTrainer`` pops it)."""

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner

    def __call__(self, items: list[tuple[torch.Tensor, str, Optional[list[int]]]]) -> dict[str, torch.Tensor]:
        pixels, captions, cells = zip(*items)
        batch = self.captioner.encode(captions)
        if any(c is not None for c in cells):
            batch["cell_targets"] = token_cells(self.captioner.tokenize(captions), cells)
        return dict(pixel_values=torch.stack(pixels), **batch)


def _training_arguments(out_dir: Path, settings: TrainSettings, progress: bool):
    on_gpu = torch.cuda.is_available()
    distributed = _world_size() > 1
    return transformers.TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay, lr_scheduler_type="cosine",
        logging_steps=settings.logging_steps, save_steps=settings.save_steps, save_total_limit=2,
        seed=settings.seed, data_seed=settings.seed, report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, use_cpu=not on_gpu, ddp_backend="gloo" if distributed and not on_gpu else None,
        disable_tqdm=not progress)


def last_checkpoint(out_dir: Path) -> Optional[str]:
    """The newest Trainer checkpoint under ``out_dir/checkpoints``, if any."""
    checkpoints = Path(out_dir) / "checkpoints"
    return transformers.trainer_utils.get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def train(captioner: Captioner, images: Sequence[Any], captions: Sequence[Sequence[str]], settings: TrainSettings,
          out_dir: Path, *, resume: bool = False, progress: bool = True, callbacks: Sequence[Any] = (),
          scenes: Optional[Sequence[Scene]] = None) -> dict[str, Any]:
    """Train ``captioner`` in place with ``settings.objective`` and its options (those the objective
    takes; selective EOS ends captions where the captioner's tokenizer does); save it to ``out_dir/model``.

    ``scenes`` (the images' truth) with ``settings.attention_grounding > 0`` adds that weight times the
    cross-attention grounding loss (``grounding.py``) to the objective's; without scenes there is none.

    With ``resume=True`` the run continues from the last checkpoint in ``out_dir`` (optimizer,
    scheduler, RNG and data order included). ``callbacks`` are ``transformers.TrainerCallback``s.
    Returns the Trainer's log history and the number of optimiser steps taken.
    """
    out_dir = Path(out_dir)
    grounded = scenes is not None and settings.attention_grounding > 0
    pairs = CaptionPairs(captioner, images, captions, scenes if grounded else None, settings.grounding_words)
    options = loss_options(settings.objective, settings.objective_options, end_of_caption_id(captioner.tokenizer))
    check(settings.objective, options, captioner.model.config.text_config.vocab_size)
    options, full_batches = row_candidates(options, settings.batch_size)
    if full_batches and len(pairs) < settings.batch_size * _world_size():
        raise ValueError(f"subset's candidate lists need full batches: {len(pairs)} captions are fewer than one "
                         f"batch of {settings.batch_size} per process; lower the batch size")
    args = _training_arguments(out_dir, settings, progress)
    args.dataloader_drop_last = full_batches  # each batch has the rows the candidate lists were repeated for
    hf.patch(captioner.model, settings.objective, **options)
    try:  # unpatched on every way out, an exception in a callback or a Ctrl-C included
        common = dict(model=captioner.model, args=args, train_dataset=pairs, data_collator=CaptionCollator(captioner),
                      callbacks=list(callbacks))
        trainer = (GroundedTrainer(weight=settings.attention_grounding, **common) if grounded
                   else transformers.Trainer(**common))
        checkpoint = last_checkpoint(out_dir) if resume else None
        if resume and checkpoint is None:
            print(f"no checkpoint under {out_dir / 'checkpoints'}: starting from the beginning")
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        hf.unpatch(captioner.model)
    if trainer.is_world_process_zero():
        captioner.save(out_dir / "model")
    if _world_size() > 1:
        atexit.register(_close_process_group)
    return {"log_history": trainer.state.log_history, "global_step": trainer.state.global_step,
            "world_size": _world_size()}


def _close_process_group() -> None:
    """At exit of a torchrun / accelerate rank: end the process group the Trainer opened, so that its
    gloo threads are joined before the interpreter goes (a rank that left them running could abort
    with "terminate called without an active exception" while another rank was still saving)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
