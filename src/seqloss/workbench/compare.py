"""``seqloss compare``: what each objective does to one captioner, side by side.

Stage 1 trains a captioner with MLE from scratch (cached by its settings: a second run skips it).
Stage 2 fine-tunes a copy of that checkpoint per objective with the same budget. All are evaluated
on held-out scenes and reported (``report.py``). On user data (``data=``), the captioner's vocabulary
comes from the training captions and the held-out images have no scene truth: recall and
hallucination are absent from the report, the other columns present.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from . import scenes
from .data import CaptionRecord
from .evaluate import EvalSet, evaluate
from .explain import token_losses
from .model import PIXEL_SPREAD, config_fingerprint, load_captioner, new_captioner, small_blip_config
from .objectives import check, loss_options, objective_name, options_per_objective
from .report import SAMPLES, write_report
from .settings import CompareSettings, TrainSettings
from .tokenizer import caption_tokenizer, end_of_caption_id, scene_tokenizer
from .train import train


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "seqloss"


def stage1_key(settings: CompareSettings) -> str:
    """Stage 1 depends on the data (the first scenes stand for how they are drawn and captioned), its
    own training settings and the model's config (a new architecture never reuses a cached model), not
    on the objectives compared."""
    model = config_fingerprint(small_blip_config(scene_tokenizer(), settings.image_size))
    sample = scenes.generate(4, seed=settings.seed, image_size=settings.image_size)  # a change of drawing or captions
    drawn = hashlib.sha256(b"".join(e.image.tobytes() for e in sample)).hexdigest()[:12]
    key = dict(train_images=settings.train_images, seed=settings.seed, image_size=settings.image_size,
               stage1=settings.stage1.key(), vocabulary=list(scenes.VOCABULARY), model=model,
               pixel_spread=PIXEL_SPREAD,
               scenes=[drawn] + [e.captions for e in sample])
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _data_key(records: Sequence[CaptionRecord]) -> str:
    """User data's part of the stage-1 cache key: names, captions, and each image's size and time."""
    rows = [(r.file_name, r.captions, r.path.stat().st_size, r.path.stat().st_mtime_ns) for r in records]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def compare(out_dir: Path, settings: Optional[CompareSettings] = None, cache_dir: Optional[Path] = None,
            progress: bool = True, data: Optional[tuple[Sequence[CaptionRecord], Sequence[CaptionRecord]]] = None
            ) -> dict[str, Any]:
    """Run both stages, evaluate, write report.json / report.md / plots under ``out_dir``.

    ``data``: user data as (training records, held-out records), e.g. from ``data.load_split``,
    instead of generated scenes. Every objective and its options are checked before stage 1.
    """
    settings = settings or CompareSettings()
    out_dir = Path(out_dir)
    if data is None:
        tokenizer, stage1_name = scene_tokenizer(), f"stage1-{stage1_key(settings)}"
    else:
        if not data[0] or not data[1]:
            raise ValueError(f"compare needs training and held-out images, got {len(data[0])} and {len(data[1])}")
        tokenizer = caption_tokenizer([r.captions for r in data[0]])
        stage1_name = f"stage1-{stage1_key(settings)}-data-{_data_key(data[0])}"
    options = options_per_objective(settings.objectives, settings.objective_options)
    for objective, given in zip(settings.objectives, options):  # every objective checked before stage 1
        check(objective, loss_options(objective, given, end_of_caption_id(tokenizer)), len(tokenizer))
    if data is None:
        train_set: Sequence[Any] = scenes.generate(settings.train_images, seed=settings.seed,
                                                   image_size=settings.image_size)
        test_set: Sequence[Any] = scenes.generate(settings.test_images, seed=settings.seed + 10_000,
                                                  image_size=settings.image_size)
    else:
        train_set, test_set = data
    out_dir.mkdir(parents=True, exist_ok=True)
    training = EvalSet.from_examples(train_set)
    images, captions = training.images, training.references

    stage1_dir = Path(cache_dir or default_cache_dir()) / stage1_name
    if (stage1_dir / "model" / "config.json").is_file():
        print(f"stage 1: reusing the MLE captioner cached in {stage1_dir}")
    else:
        guided = (f", cross-attention guided to each object's cell, weight {settings.stage1.attention_grounding:g}"
                  if training.scenes is not None and settings.stage1.attention_grounding > 0 else "")
        print(f"stage 1: training a captioner with MLE ({settings.stage1.steps} steps{guided}) → {stage1_dir}")
        train(new_captioner(tokenizer, settings.image_size, settings.seed, images=images), images, captions,
              settings.stage1, stage1_dir, progress=progress, scenes=training.scenes)

    evaluation = EvalSet.from_examples(test_set)
    results: dict[str, dict[str, Any]] = {}
    for objective, given in zip(settings.objectives, options):
        name = objective_name(objective)
        print(f"stage 2: fine-tuning with {name} ({settings.stage2_steps} steps)")
        captioner = load_captioner(stage1_dir / "model")
        stage2 = TrainSettings(objective=objective, steps=settings.stage2_steps,
                               learning_rate=settings.stage2_learning_rate, batch_size=settings.stage1.batch_size,
                               warmup_steps=0, seed=settings.seed, save_steps=settings.stage2_steps,
                               logging_steps=max(1, settings.stage2_steps // 5), objective_options=given)
        train(captioner, images, captions, stage2, out_dir / "runs" / name, progress=progress)
        results[name] = evaluate(captioner, evaluation, settings.generation)
    views = token_views(load_captioner(stage1_dir / "model"), evaluation, results, settings.objectives,
                        [loss_options(o, g, end_of_caption_id(tokenizer)) for o, g in zip(settings.objectives, options)])
    return write_report(out_dir, results, evaluation, settings=json.loads(json.dumps(asdict(settings), default=str)),
                        token_views=views)


def token_views(captioner: Any, evaluation: EvalSet, results: dict[str, dict[str, Any]], objectives: Sequence[Any],
                options: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For the sample images: each token's loss under each objective, from the stage-1 captioner (the
    common start of every fine-tuning), of the first reference and of each objective's caption."""
    per_name = {objective_name(o): opts for o, opts in zip(objectives, options)}
    views = []
    for i in range(min(SAMPLES, len(evaluation.images))):
        image = evaluation.images[i]
        chosen = [("reference: " + evaluation.references[i][0], evaluation.references[i][0])]
        chosen += [(f"{name}'s caption: {r['captions'][i]}", r["captions"][i]) for name, r in results.items()]
        views.append({"name": evaluation.names[i] if evaluation.names else str(i), "image": image,
                      "captions": [(label, token_losses(captioner, image, text, objectives, per_name))
                                   for label, text in chosen]})
    return views
