"""The captioner: a small BLIP built from a config (no download), or any local Hugging Face BLIP.

A model directory holds what ``save_pretrained`` writes for the model, its tokenizer and its
image processor, so ``load_captioner(dir)`` reads a workbench checkpoint and a BLIP checkpoint alike.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import transformers

from .settings import IMAGE_SIZE

# The scenes are a 3x3 grid (scenes.py); a 72-px image in 24-px patches gives the vision tower one
# token per cell, so each object is seen whole by one patch and its position is the token's index.
GRID = 3


@dataclass
class Captioner:
    """A BLIP model with the tokenizer and image processor that go with it."""

    model: Any
    tokenizer: Any
    image_processor: Any

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        return directory

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images → (B, 3, H, W) pixel values, normalised as the model expects."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def encode(self, captions: Sequence[str], max_length: int = 32) -> dict[str, torch.Tensor]:
        """Captions → input_ids, attention_mask and labels (padding → -100), BLIP's decoder convention:
        the first id is the decoder's BOS, the caption ends with [SEP]."""
        batch = self.tokenize(captions, max_length)
        input_ids = batch["input_ids"].clone()
        input_ids[:, 0] = self.model.config.text_config.bos_token_id
        attention_mask = batch["attention_mask"]
        return dict(input_ids=input_ids, attention_mask=attention_mask,
                    labels=input_ids.masked_fill(attention_mask == 0, -100))

    def tokenize(self, captions: Sequence[str], max_length: int = 32) -> Any:
        """The tokenizer's ``BatchEncoding`` of ``captions``, padded and truncated as ``encode`` does
        (its ``word_ids`` map tokens back to words)."""
        return self.tokenizer(list(captions), padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def caption(self, images: Sequence[Any], *, num_beams: int = 3, top_p: Optional[float] = None,
                max_new_tokens: int = 30, seed: int = 0, batch_size: int = 64) -> list[str]:
        """Beam search (``num_beams``) or nucleus sampling (``top_p``), as BLIP's ``generate`` does."""
        self.model.eval()
        options: dict[str, Any] = dict(max_new_tokens=max_new_tokens)
        if top_p is not None:
            torch.manual_seed(seed)
            options.update(do_sample=True, top_p=top_p, num_beams=1)
        else:
            options.update(num_beams=num_beams, do_sample=False)
        out: list[str] = []
        for start in range(0, len(images), batch_size):
            pixel_values = self.pixels(images[start:start + batch_size]).to(self.model.device)
            ids = self.model.generate(pixel_values=pixel_values, **options)
            out += [" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out


def small_blip_config(tokenizer: Any, image_size: int = IMAGE_SIZE):
    """A BLIP sized for CPU training in minutes: one patch per cell of the scenes' 3x3 grid
    (``image_size // 3``) and a 2-layer text decoder, both 192 wide.

    Three settings differ from ``BlipConfig``'s defaults, which are meant for loading pretrained weights:

    * ``initializer_range=0.02`` in the vision config: the default, 1e-10, starts every vision weight,
      the position embedding included, at ~0, so the image features are ~0 and carry no position.
    * width 192, not 96: the vision width is also the width of the keys and values that the decoder's
      cross-attention reads; at 96 the captions grounded far more slowly (in one short run, 0.49 of
      the facts stated after 400 steps were false, against 0.26 at 192).
    * no vision transformer layers: each image token is one cell's patch embedding plus its position
      embedding, normalised, and the decoder's cross-attention does the looking. With the two layers
      of earlier versions the tokens mixed, the decoder never learned where an object is (teacher-
      forced, it chose an object's position word at chance, 0.21 of five, after 4,500 steps). Without
      them, 2 of 4 initialisations learned to bind position to object (0.76-0.79 within 6,000 steps);
      the other 2 learned only which cells hold objects (0.38-0.40, as guessing among them gives).
      Stage 1 of ``compare`` now guides the cross-attention to each object's cell (``grounding.py``).
    """
    text = dict(vocab_size=len(tokenizer), hidden_size=192, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=384, max_position_embeddings=40, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                eos_token_id=tokenizer.sep_token_id)
    vision = dict(hidden_size=192, num_hidden_layers=0, num_attention_heads=4, intermediate_size=384,
                  image_size=image_size, patch_size=max(1, image_size // GRID), dropout=0.0, attention_dropout=0.0,
                  initializer_range=0.02)
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=192)


def config_fingerprint(config: Any) -> str:
    """A short hash of a model config (without the transformers version that wrote it): caches of
    trained models are keyed by it, so a change of architecture never reuses an old model."""
    settings = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
    for part in ("text_config", "vision_config"):
        if isinstance(settings.get(part), dict):
            settings[part] = {k: v for k, v in settings[part].items() if k != "transformers_version"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pixel_statistics(images: Sequence[Any], limit: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the first ``limit`` of ``images`` (PIL, any sizes),
    on the 0-1 scale, every pixel weighted alike."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for image in list(images)[:limit]:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(axis=0)
        squares += (pixels ** 2).sum(axis=0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean ** 2, 1e-12))
    return mean.tolist(), std.tolist()


# How the pixels and the position embedding start (new_captioner with images). After training, the
# patch embeddings of the earlier default had a norm of ~430 against ~1 for the position embedding:
# Adam grows a 1728-input projection far faster than an additive table, and position was drowned.
# So the position embedding starts at the patch embeddings' scale, and pixels are divided by 4x their
# standard deviation, which slows the patch embeddings' growth (with the earlier tower: hallucination
# 0.083 with both after 3,000 steps, 0.118 with the position scale alone after 4,500).
PIXEL_SPREAD = 4.0


def new_captioner(tokenizer: Any, image_size: int = IMAGE_SIZE, seed: int = 0,
                  images: Optional[Sequence[Any]] = None) -> Captioner:
    """A randomly initialised small BLIP for ``tokenizer``'s vocabulary.

    ``images`` (a sample of the training images): normalise pixels with their per-channel mean and
    ``PIXEL_SPREAD`` times their standard deviation, saved with the image processor, and start the
    position embedding at the scale of those images' patch embeddings. The default, CLIP's statistics
    as in BLIP, suits photographs; on the near-white scenes it maps the background to a large constant
    (~1.9) that dominates every patch. With the scenes' own statistics, even an untrained vision tower's
    tokens tell the objects' colours apart far better (a linear probe: 0.83 against 0.58).
    """
    torch.manual_seed(seed)
    model = transformers.BlipForConditionalGeneration(small_blip_config(tokenizer, image_size))
    processor = transformers.BlipImageProcessor(size={"height": image_size, "width": image_size})
    captioner = Captioner(model, tokenizer, processor)
    if images is not None and len(images):
        mean, std = pixel_statistics(images)
        processor.image_mean, processor.image_std = mean, [PIXEL_SPREAD * s for s in std]
        embeddings = model.vision_model.embeddings
        with torch.no_grad():
            patches = embeddings.patch_embedding(captioner.pixels(list(images)[:200]))
            embeddings.position_embedding.normal_(0.0, float(patches.pow(2).mean().sqrt()))
    return captioner


def load_captioner(directory: Path) -> Captioner:
    """A workbench checkpoint or any local BLIP directory (model, tokenizer, image processor)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    model = transformers.BlipForConditionalGeneration.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    processor = transformers.BlipImageProcessor.from_pretrained(directory)
    return Captioner(model, tokenizer, processor)
