"""Caption a held-out set and score it: length, vocabulary, BLEU-4 and CIDEr against the references,
and — where the scene truth is known — exact attribute recall and hallucination rate."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .data import open_image
from .metrics import false_facts_by_kind, scene_scores, text_scores
from .model import Captioner
from .probe import position_accuracy
from .settings import Generation


@dataclass
class EvalSet:
    """Images with their reference captions and, for scenes, their truth."""

    images: list[Any]
    references: list[list[str]]
    scenes: Optional[list[Any]] = None
    names: Optional[list[str]] = None

    @classmethod
    def from_examples(cls, examples: Sequence[Any]) -> EvalSet:
        """From ``scenes.generate`` examples or ``data.load_captions`` records."""
        images = [e.image if hasattr(e, "image") else open_image(e.path) for e in examples]
        scenes = [getattr(e, "scene", None) for e in examples]
        return cls(images, [list(e.captions) for e in examples],
                   scenes if all(s is not None for s in scenes) else None, [e.file_name for e in examples])


def evaluate(captioner: Captioner, data: EvalSet, generation: Optional[Generation] = None) -> dict[str, Any]:
    """Metrics, the generated captions (one per image) and the images' names; on scenes also
    ``false_facts_by_kind`` (stated and false facts per kind: shape, colour, size, position) and
    ``position_accuracy``, the teacher-forced grounding probe (``probe.py``: does the captioner put
    each object of a multi-object scene where it is?).

    ``distinct_captions`` counts different captions: a captioner that looks at the image writes
    nearly one per image, one that does not repeats a few templates.
    """
    captions = captioner.caption(data.images, **(generation or Generation()).options())
    metrics = text_scores(captions, data.references)
    metrics["distinct_captions"] = len(set(captions))
    names = data.names or [str(i) for i in range(len(captions))]
    result = {"metrics": metrics, "captions": captions, "images": names}
    if data.scenes is not None:
        metrics.update(scene_scores(captions, data.scenes))
        if any(len(scene.objects) > 1 for scene in data.scenes):
            metrics["position_accuracy"] = position_accuracy(captioner, data.images, data.scenes)
        result["false_facts_by_kind"] = false_facts_by_kind(captions, data.scenes)
    return result


def captions_by_image(result: dict[str, Any]) -> list[dict[str, str]]:
    """``[{"image": file name, "caption": text}, ...]`` of an ``evaluate`` result (for JSON files)."""
    return [{"image": name, "caption": caption} for name, caption in zip(result["images"], result["captions"])]


def load_images(paths: Sequence[Path]) -> list[Any]:
    """RGB images; ValueError naming the first file that is missing or not an image."""
    return [open_image(p) for p in paths]
