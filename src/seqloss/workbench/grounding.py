"""Teaching the stage-1 captioner *where* to look: a loss on the decoder's cross-attention.

Without help, the small captioner learns which cells hold objects long before it learns which object
is in which cell, and on about one initialisation in two it never does within its budget (docs/
workbench.md, "Learning *where*"). On scenes the answer is known: a reference's words about an
object — its position phrase above all — are about the one image token of the object's cell (the
vision tower has one token per cell of the 3×3 grid after a CLS token, and no layers that mix them,
``model.py``). So at each position whose label is such a word, the decoder's cross-attention is asked
to put its mass on that token:

    loss = mean over targeted positions (b, n) and decoder layers l of  -log a_l[b, n, cell(b, n)]

where ``a_l`` is layer l's cross-attention averaged over heads, read at the position that *predicts*
the word (labels are shifted inside BLIP, as everywhere in seqloss). It is added to the objective's
loss with a small weight (``TrainSettings.attention_grounding``) by ``GroundedTrainer``; captions
without a scene (user data) carry no targets and get no such term.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
import transformers

from .metrics import fact_spans
from .model import GRID
from .scenes import CELLS, Scene
from .tokenizer import caption_words

NO_CELL = -100  # a position with no grounding target, as ignore_index is for labels
# Which words of a reference get a target: the words of a position phrase ("position"), or every word
# that states a fact about an object — its size, colour and shape words too ("object").
TARGET_WORDS = ("position", "object")


def cell_token(position: str) -> int:
    """The index, among the vision tower's output tokens, of the cell a position word names: BLIP
    prepends a CLS token, then the patches run row by row (``patch_embeds.flatten(2)``)."""
    col, row = CELLS[position]
    return 1 + row * GRID + col


def word_cells(caption: str, scene: Scene, words: str = "position") -> list[int]:
    """For each word of ``caption`` (``tokenizer.caption_words``), the image token of the object it is
    about, or ``NO_CELL``. The words are found by the metrics' parser (``fact_spans``); a word about a
    shape the scene does not hold (a reference never has one) gets no target."""
    if words not in TARGET_WORDS:
        raise ValueError(f"words must be one of {TARGET_WORDS}, got {words!r}")
    tokens = caption_words(caption)
    where = {obj.shape: cell_token(obj.position) for obj in scene.objects}
    cells = [NO_CELL] * len(tokens)
    for fact, start, end in fact_spans(" ".join(tokens)):
        if (words == "position" and fact[0] != "position") or fact[1] not in where:
            continue
        cells[start:end] = [where[fact[1]]] * (end - start)
    return cells


def token_cells(batch: Any, cells: Sequence[Optional[Sequence[int]]]) -> torch.Tensor:
    """Per-word targets → (B, N) per-token targets in the layout of ``batch["input_ids"]`` (a fast
    tokenizer's ``BatchEncoding``: ``word_ids`` map tokens to words; every piece of a word gets the
    word's target; special tokens, padding and rows without targets get ``NO_CELL``)."""
    out = torch.full(batch["input_ids"].shape, NO_CELL, dtype=torch.long)
    for row, row_cells in enumerate(cells):
        if row_cells is None:
            continue
        for n, word in enumerate(batch.word_ids(row)):
            if word is not None and word < len(row_cells):
                out[row, n] = row_cells[word]
    return out


def attention_grounding_loss(cross_attentions: Sequence[torch.Tensor], cell_targets: torch.Tensor) -> torch.Tensor:
    """``mean -log(attention mass on the target cell)`` (see the module), 0 with a gradient path when
    no position has a target.

    ``cross_attentions``: per decoder layer (B, H, N, K) attention probabilities over the K image
    tokens; ``cell_targets``: (B, N) unshifted, as the labels (``NO_CELL`` = none): the query at
    position n predicts token n+1, so it is scored against ``cell_targets[:, n + 1]``.
    """
    targets = cell_targets[:, 1:].to(cross_attentions[0].device)  # (B, N-1)
    has_target = targets != NO_CELL
    total = cross_attentions[0].sum() * 0.0
    if not has_target.any():
        return total
    for attention in cross_attentions:
        mass = attention[:, :, :-1].mean(1)  # (B, N-1, K): the heads' average, at the predicting positions
        on_cell = mass.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, N-1)
        total = total - torch.log(on_cell[has_target].clamp(min=1e-9)).mean()
    return total / len(cross_attentions)


def cross_attention_modules(model: Any) -> list[torch.nn.Module]:
    """The attention modules of a BLIP text decoder's cross-attention blocks, one per layer; each
    returns ``(context, attention_probs)``."""
    return [layer.crossattention.self for layer in model.text_decoder.bert.encoder.layer]


@contextlib.contextmanager
def recorded(modules: Sequence[torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward of ``modules`` appends its attention probabilities (output 1,
    with its graph) to the yielded list. Hooks, not ``output_attentions``: BLIP's captioning output
    does not pass the decoder's cross-attentions on."""
    found: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _args, out: found.append(out[1])) for m in modules]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class GroundedTrainer(transformers.Trainer):
    """A ``Trainer`` whose loss is the model's (the patched objective's) plus ``weight`` × the
    attention-grounding loss of batches that carry ``cell_targets`` (popped before the model sees the
    batch). The term's running mean is logged as ``grounding_loss``."""

    def __init__(self, *args: Any, weight: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weight = weight
        self._modules = cross_attention_modules(self.model)
        self._seen: list[float] = []

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        cell_targets = inputs.pop("cell_targets", None)
        if cell_targets is None or self.weight == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with recorded(self._modules) as attentions:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        grounding = attention_grounding_loss(attentions, cell_targets)
        self._seen.append(float(grounding.detach()))
        loss = loss + self.weight * grounding
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._seen and "loss" in logs:
            logs["grounding_loss"] = round(sum(self._seen) / len(self._seen), 4)
            self._seen.clear()
        super().log(logs, *args, **kwargs)
