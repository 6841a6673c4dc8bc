"""What the workbench's runs do, as plain data: importable without the training stack (the CLI shows
these defaults in ``--help`` and checks objectives before anything heavy loads)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

IMAGE_SIZE = 72  # pixels: a 3 × 3 grid of 24-pixel cells, one vision patch each (see model.py)
# ``seqloss bench``'s shapes (B, N, V, H): a BLIP captioning batch, a GPT-2 batch, a small one for a quick look.
BENCH_SHAPES = {"blip": (32, 40, 30524, 768), "gpt2": (8, 128, 50257, 768), "small": (8, 64, 8192, 256)}


@dataclass
class LossOptions:
    """The objective's options as a user gives them once (``--exclude-ids 0 3``); None = not given.
    Each goes to the members of an objective that take it (``objectives.loss_options``)."""

    eos_token_id: Optional[int] = None
    exclude_ids: Optional[list[int]] = None
    include_ids: Optional[list[int]] = None
    num_samples: Optional[int] = None
    first_token_mle: Optional[bool] = None
    label_smoothing: Optional[float] = None


@dataclass
class TrainSettings:
    """What a training run does; stage-1 caches are keyed by these (plus the data)."""

    objective: Any = "mle"
    steps: int = 400
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    save_steps: int = 100
    logging_steps: int = 20
    objective_options: LossOptions = field(default_factory=LossOptions)
    # On scenes: the weight of the cross-attention grounding loss (grounding.py; 0 = none) and which
    # words of a reference it supervises ("position": position phrases; "object": every fact's words).
    attention_grounding: float = 0.0
    grounding_words: str = "position"

    def key(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """How captions are decoded: beam search (BLIP's default for captioning) or nucleus sampling."""

    num_beams: int = 3
    top_p: Optional[float] = None
    max_new_tokens: int = 30
    seed: int = 0

    def options(self) -> dict[str, Any]:
        return dict(num_beams=self.num_beams, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed)


@dataclass
class CompareSettings:
    """The embedded default of ``seqloss compare``: sized to finish in minutes on 2 CPU cores."""

    objectives: list[Any] = field(default_factory=lambda: ["mle", "smile"])
    train_images: int = 4000
    test_images: int = 100
    seed: int = 0
    image_size: int = IMAGE_SIZE
    # Stage 1 on scenes is guided by the cross-attention grounding loss (grounding.py): with it every
    # initialisation learns where each object is within ~1,000 steps, which let stage 1 halve (was 6,000).
    stage1: TrainSettings = field(default_factory=lambda: TrainSettings(objective="mle", steps=3000,
                                                                        attention_grounding=0.1))
    stage2_steps: int = 400
    stage2_learning_rate: float = 5e-4
    generation: Generation = field(default_factory=Generation)
    objective_options: LossOptions = field(default_factory=LossOptions)  # each goes where it applies
