"""Does the captioner know where each object is? A teacher-forced probe of grounding on scenes.

For every object of a held-out scene with two or more objects, the captioner reads the image and
scores the five captions that put the object's description ``"a COLOUR SHAPE"`` with each of the
five position phrases (``on the left``, ``on the right``, ``at the top``, ``at the bottom``, ``in the
center``), by their log-likelihood — in either order the scenes' references use, the phrase after
the description (``a red circle on the left``) or before it (``on the left a red circle``), the two
orders' probabilities added. ``position_accuracy`` is the share of objects whose own position
scores highest. Guessing among the five gives 0.2; knowing only which cells hold objects (not which
object is where) gives about 0.4 on these scenes; a captioner that binds each object to its cell
gives far more. Decoding plays no part: this measures what the model has learned, where the
generated captions' false positions measure what it says.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .model import Captioner
from .scenes import POSITION_PHRASES, POSITIONS, Scene

PHRASES = [POSITION_PHRASES[p][0] for p in POSITIONS]  # one phrase per position, in POSITIONS' order


def _description(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def candidates(colour: str, shape: str) -> list[str]:
    """The 2 × 5 captions scored for one object: description then phrase, phrase then description."""
    described = _description(colour, shape)
    return [f"{described} {phrase}" for phrase in PHRASES] + [f"{phrase} {described}" for phrase in PHRASES]


@torch.no_grad()
def position_accuracy(captioner: Captioner, images: Sequence[Any], scenes: Sequence[Scene],
                      batch_size: int = 80) -> float:
    """The share of objects in multi-object scenes whose own position is the likeliest."""
    captioner.model.eval()
    items = [(i, obj) for i, scene in enumerate(scenes) if len(scene.objects) > 1 for obj in scene.objects]
    if not items:
        raise ValueError("the position probe needs scenes with two or more objects")
    per_object = 2 * len(PHRASES)
    hits = 0
    for start in range(0, len(items), max(1, batch_size // per_object)):
        chunk = items[start:start + max(1, batch_size // per_object)]
        batch = captioner.encode([text for _, obj in chunk for text in candidates(obj.colour, obj.shape)])
        pixels = captioner.pixels([images[i] for i, _ in chunk for _ in range(per_object)])
        logits = captioner.model(pixel_values=pixels, input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
        targets = batch["input_ids"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
        words = batch["attention_mask"][:, 1:].bool() & (targets != captioner.tokenizer.sep_token_id)
        score = (logp * words).sum(1).view(len(chunk), 2, len(PHRASES)).logsumexp(1)   # both orders
        hits += sum(int(POSITIONS[int(best)] == obj.position) for best, (_, obj) in zip(score.argmax(1), chunk))
    return hits / len(items)
