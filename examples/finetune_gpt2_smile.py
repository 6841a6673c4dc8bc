"""Fine-tune a tiny GPT-2 with SMILE through ``transformers.Trainer`` on generated text.

Everything is built offline: the model from a small config, the "text" from a seeded generator
(sentences of a toy language: a subject, a verb and a few attributes, then an end token), stored
as a ``datasets.Dataset``. The loss comes from ``seqloss.hf.compute_loss_func`` — swap the
objective for ``"mle"`` or ``{"mle": 0.01, "smile": 0.99}`` to compare.

    python examples/finetune_gpt2_smile.py [--objective smile] [--steps 30]
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import seqloss.hf

VOCAB, LENGTH, EOS = 64, 16, 1


def toy_sentences(n: int, seed: int = 0) -> Dataset:
    """Rows of ids: subject (2..9), verb (10..19), 1–6 attributes (20..63), EOS, then padding (-100 labels)."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for _ in range(n):
        k = int(torch.randint(1, 7, (1,), generator=g))
        ids = [int(torch.randint(2, 10, (1,), generator=g)), int(torch.randint(10, 20, (1,), generator=g))]
        ids += torch.randint(20, VOCAB, (k,), generator=g).tolist() + [EOS]
        pad = LENGTH - len(ids)
        rows["input_ids"].append(ids + [0] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["labels"].append(ids + [-100] * pad)
    return Dataset.from_dict(rows)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=EOS, eos_token_id=EOS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def main(objective="smile", steps: int = 30, out_dir: str = None, seed: int = 0) -> dict:
    """Train ``steps`` optimiser steps; returns the Trainer's log history and the final loss."""
    data = toy_sentences(256, seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=out_dir or tmp, max_steps=steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, logging_steps=max(1, steps // 5), save_strategy="no",
                                 report_to=[], seed=seed, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=data,
                          compute_loss_func=seqloss.hf.compute_loss_func(objective, shift=True))
        result = trainer.train()
    return {"train_loss": result.training_loss, "log": trainer.state.log_history}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="smile")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    out = main(args.objective, args.steps)
    for entry in out["log"]:
        if "loss" in entry:
            print(f"step {entry['step']:3d}  {args.objective} loss {entry['loss']:.4f}")
