"""Caption a held-out set and score it: length, vocabulary, BLEU-4 and CIDEr against the references,
and — where the scene truth is known — exact attribute recall and hallucination rate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from PIL import Image

from .metrics import scene_scores, text_scores
from .model import Captioner


@dataclass
class Generation:
    """How captions are decoded: beam search (BLIP's default for captioning) or nucleus sampling."""

    num_beams: int = 3
    top_p: Optional[float] = None
    max_new_tokens: int = 30
    seed: int = 0

    def options(self) -> Dict[str, Any]:
        return dict(num_beams=self.num_beams, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed)


@dataclass
class EvalSet:
    """Images with their reference captions and, for scenes, their truth."""

    images: List[Any]
    references: List[List[str]]
    scenes: Optional[List[Any]] = None
    names: Optional[List[str]] = None

    @classmethod
    def from_examples(cls, examples: Sequence[Any]) -> "EvalSet":
        """From ``scenes.generate`` examples or ``data.load_imagefolder`` records."""
        images = [e.image if hasattr(e, "image") else Image.open(e.path).convert("RGB") for e in examples]
        scenes = [getattr(e, "scene", None) for e in examples]
        return cls(images, [list(e.captions) for e in examples],
                   scenes if all(s is not None for s in scenes) else None, [e.file_name for e in examples])


def evaluate(captioner: Captioner, data: EvalSet, generation: Generation = Generation()) -> Dict[str, Any]:
    """Metrics and the generated captions (one per image)."""
    captions = captioner.caption(data.images, **generation.options())
    metrics = text_scores(captions, data.references)
    if data.scenes is not None:
        metrics.update(scene_scores(captions, data.scenes))
    return {"metrics": metrics, "captions": captions}


def load_images(paths: Sequence[Path]) -> List[Any]:
    return [Image.open(p).convert("RGB") for p in paths]
