"""Does the captioner know where each object is? A teacher-forced probe of grounding on scenes.

For every object of a held-out scene with two or more objects, the captioner reads the image and
the caption prefix ``"a COLOUR SHAPE"`` and scores each of the five position phrases that could
follow (``on the left``, ``on the right``, ``at the top``, ``at the bottom``, ``in the center``) by
the summed log-probability of its words. ``position_accuracy`` is the share of objects whose own
position scores highest. Guessing among the five gives 0.2; knowing only which cells hold objects
(not which object is where) gives about 0.4 on these scenes; a captioner that binds each object to
its cell gives far more. Decoding plays no part: this measures what the model has learned, where
the generated captions' false positions measure what it says.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .model import Captioner
from .scenes import POSITION_PHRASES, POSITIONS, Scene

PHRASES = [POSITION_PHRASES[p][0] for p in POSITIONS]  # one phrase per position, in POSITIONS' order


def _prefix(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


@torch.no_grad()
def position_accuracy(captioner: Captioner, images: Sequence[Any], scenes: Sequence[Scene],
                      batch_size: int = 64) -> float:
    """The share of objects in multi-object scenes whose own position phrase scores highest."""
    captioner.model.eval()
    items = [(i, obj) for i, scene in enumerate(scenes) if len(scene.objects) > 1 for obj in scene.objects]
    if not items:
        raise ValueError("the position probe needs scenes with two or more objects")
    hits = 0
    per_batch = max(1, batch_size // len(PHRASES))
    for start in range(0, len(items), per_batch):
        chunk = items[start:start + per_batch]
        texts = [f"{_prefix(obj.colour, obj.shape)} {phrase}" for _, obj in chunk for phrase in PHRASES]
        batch = captioner.encode(texts)
        pixels = captioner.pixels([images[i] for i, _ in chunk for _ in PHRASES])
        logits = captioner.model(pixel_values=pixels, input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, batch["input_ids"][:, 1:].unsqueeze(-1))
        logp = logp.squeeze(-1)                                                  # (rows, L - 1)
        # the phrase's three words: after [BOS] a COLOUR SHAPE, positions 4-6 of the ids (3-5 after the shift)
        scores = logp[:, 3:6].sum(1).view(len(chunk), len(PHRASES))
        hits += sum(int(POSITIONS[int(best)] == obj.position) for best, (_, obj) in zip(scores.argmax(1), chunk))
    return hits / len(items)
