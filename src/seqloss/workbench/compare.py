"""``seqloss compare``: what each objective does to one captioner, side by side.

Stage 1 trains a captioner with MLE from scratch (cached by its settings: a second run skips it).
Stage 2 fine-tunes a copy of that checkpoint per objective with the same budget. All are evaluated
on held-out scenes and reported (``report.py``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import scenes
from .evaluate import EvalSet, Generation, evaluate
from .model import load_captioner, new_captioner
from .report import write_report
from .tokenizer import scene_tokenizer
from .train import TrainSettings, train


@dataclass
class CompareSettings:
    """The embedded default: sized to finish in minutes on 2 CPU cores."""

    objectives: List[Any] = field(default_factory=lambda: ["mle", "smile"])
    train_images: int = 2000
    test_images: int = 100
    seed: int = 0
    image_size: int = 64
    stage1: TrainSettings = field(default_factory=lambda: TrainSettings(objective="mle", steps=1500))
    stage2_steps: int = 400
    stage2_learning_rate: float = 5e-4
    generation: Generation = field(default_factory=Generation)


def objective_name(objective: Any) -> str:
    """'smile' or 'mle=0.01,smile=0.99' — also a safe directory name."""
    if isinstance(objective, str):
        return objective
    return ",".join(f"{name}={weight:g}" for name, weight in objective.items())


def parse_objective(text: str) -> Any:
    """'smile' → 'smile'; 'mle=0.01,smile=0.99' → {'mle': 0.01, 'smile': 0.99}."""
    if "=" not in text:
        return text.strip()
    mixture = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if not re.fullmatch(r"[a-z_]+", name.strip()):
            raise ValueError(f"cannot read objective {text!r}: expected NAME or NAME=WEIGHT,NAME=WEIGHT")
        try:
            mixture[name.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"cannot read objective {text!r}: weight {weight!r} is not a number") from None
    return mixture


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seqloss"


def stage1_key(settings: CompareSettings) -> str:
    """Stage 1 depends on the data and its own training settings, not on the objectives compared."""
    key = dict(train_images=settings.train_images, seed=settings.seed, image_size=settings.image_size,
               stage1=settings.stage1.key(), vocabulary=list(scenes.VOCABULARY))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def compare(out_dir: Path, settings: CompareSettings = CompareSettings(), cache_dir: Optional[Path] = None,
            progress: bool = True) -> Dict[str, Any]:
    """Run both stages, evaluate, write report.json / report.md / plots under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set = scenes.generate(settings.train_images, seed=settings.seed, image_size=settings.image_size)
    test_set = scenes.generate(settings.test_images, seed=settings.seed + 10_000, image_size=settings.image_size)
    images, captions = [e.image for e in train_set], [e.captions for e in train_set]

    stage1_dir = Path(cache_dir or default_cache_dir()) / f"stage1-{stage1_key(settings)}"
    if (stage1_dir / "model" / "config.json").is_file():
        print(f"stage 1: reusing the MLE captioner cached in {stage1_dir}")
    else:
        print(f"stage 1: training a captioner with MLE ({settings.stage1.steps} steps) → {stage1_dir}")
        train(new_captioner(scene_tokenizer(), settings.image_size, settings.seed), images, captions,
              settings.stage1, stage1_dir, progress=progress)

    evaluation = EvalSet.from_examples(test_set)
    results: Dict[str, Dict[str, Any]] = {}
    for objective in settings.objectives:
        name = objective_name(objective)
        print(f"stage 2: fine-tuning with {name} ({settings.stage2_steps} steps)")
        captioner = load_captioner(stage1_dir / "model")
        stage2 = TrainSettings(objective=objective, steps=settings.stage2_steps,
                               learning_rate=settings.stage2_learning_rate, batch_size=settings.stage1.batch_size,
                               warmup_steps=0, seed=settings.seed, save_steps=settings.stage2_steps,
                               logging_steps=max(1, settings.stage2_steps // 5))
        train(captioner, images, captions, stage2, out_dir / "runs" / name, progress=progress)
        results[name] = evaluate(captioner, evaluation, settings.generation)
    report = write_report(out_dir, results, evaluation, settings=json.loads(json.dumps(asdict(settings), default=str)))
    return report
