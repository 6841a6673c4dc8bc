"""Patch a BLIP captioner to train with SMILE (the authors' released mixture), in one call.

A small ``BlipForConditionalGeneration`` is built from a config (no download) and fed random
images with captions; ``seqloss.hf.patch`` makes its own ``forward(labels=...)`` compute
``{"mle": 0.01, "smile": 0.99}`` with BLIP's convention (shift inside, the decoder's label
smoothing). A few optimiser steps show the patched loss going down; ``unpatch`` restores BLIP's.

    python examples/patch_blip_captioner.py [--steps 10]
"""
from __future__ import annotations

import argparse

import torch
from transformers import BlipConfig, BlipForConditionalGeneration

import seqloss.hf

VOCAB, LENGTH, IMAGE = 96, 10, 32


def tiny_blip() -> BlipForConditionalGeneration:
    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=LENGTH, bos_token_id=1, sep_token_id=2, pad_token_id=0, label_smoothing=0.1)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=IMAGE, patch_size=8)
    return BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))


def batch(n: int = 8, seed: int = 0) -> dict:
    """Images and captions: BOS, words, [SEP], padding (labels -100 on padding, as BLIP's collator does)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
    ids[:, 0] = 1
    lengths = torch.randint(4, LENGTH, (n,), generator=g)
    position = torch.arange(LENGTH)
    ids[position == lengths[:, None]] = 2
    ids[position > lengths[:, None]] = 0
    return dict(pixel_values=torch.randn(n, 3, IMAGE, IMAGE, generator=g), input_ids=ids,
                attention_mask=(ids != 0).long(), labels=ids.masked_fill(ids == 0, -100))


def main(steps: int = 10) -> list:
    model = tiny_blip()
    seqloss.hf.patch(model, {"mle": 0.01, "smile": 0.99})
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data, losses = batch(), []
    for _ in range(steps):
        loss = model(**data).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    seqloss.hf.unpatch(model)
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    for step, value in enumerate(main(parser.parse_args().steps)):
        print(f"step {step:2d}  mle=0.01,smile=0.99 loss {value:.4f}")
