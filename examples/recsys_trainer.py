"""Train a BERT4Rec-style and a SASRec-style next-item model with ``transformers.Trainer``, end to end.

The data are walks on a generated Markov chain (``markov_sessions.py``): lists of item ids, the
form a recommender's sessions come in. ``seqloss.masking.DataCollator`` turns them into batches:

  * BERT4Rec: ``BertForMaskedLM`` over the item ids with ``DataCollator("mlm", mask_token_id=...)``;
  * SASRec: ``GPT2LMHeadModel`` over the item ids with ``DataCollator("clm")`` (unshifted labels:
    the model shifts them).

Both are plain Hugging Face models built from configs (no download) trained by their own loss;
``Trainer`` evaluates on ``collator.eval_examples(...)`` (the last item of each held-out session,
eval-mode masking). Then recall@10 and NDCG@10 of the last item are printed for both.
Run: ``python examples/recsys_trainer.py [--steps 600]``.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markov_sessions import as_examples, markov_chain, markov_sessions  # noqa: E402

from seqloss.masking import DataCollator  # noqa: E402

NUM_ITEMS = 300        # item ids 1 .. NUM_ITEMS; 0 pads
MASK = NUM_ITEMS + 1   # BERT4Rec's [MASK] id
MAX_LENGTH = 20
HIDDEN = 64


def bert4rec() -> Any:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=NUM_ITEMS + 2, hidden_size=HIDDEN, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=4 * HIDDEN,
                                      max_position_embeddings=MAX_LENGTH, pad_token_id=0, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0))


def sasrec() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=NUM_ITEMS + 1, n_embd=HIDDEN, n_layer=2, n_head=2,
                                      n_positions=MAX_LENGTH, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def rank_metrics(model: Any, collator: DataCollator, eval_examples: list[dict], k: int = 10) -> dict[str, float]:
    """recall@k and NDCG@k of the labelled item of each eval example (its last item)."""
    batch = collator(eval_examples)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    if collator.scheme.name == "clm":  # unshifted labels: position i predicts labels[:, i + 1]
        logits, labels = logits[:, :-1], labels[:, 1:]
    scores = logits[labels != -100][:, :NUM_ITEMS + 1].float()   # (T, items): the [MASK] id is no item
    scores[:, 0] = float("-inf")                                  # nor is padding
    target = labels[labels != -100]
    rank = (scores > scores.gather(1, target.unsqueeze(1))).sum(1)  # 0 = ranked first
    hit = rank < k
    ndcg = torch.where(hit, 1.0 / torch.log2(rank.double() + 2), 0.0)
    return {f"recall@{k}": hit.double().mean().item(), f"ndcg@{k}": ndcg.mean().item()}


def train(name: str, train_examples: list[dict], test_examples: list[dict], steps: int, batch_size: int,
          seed: int) -> dict[str, Any]:
    """Train one model through ``Trainer``; its eval loss and ranking metrics on ``test_examples``."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(seed)
    if name == "bert4rec":
        model = bert4rec()
        collator = DataCollator("mlm", padding_idx=0, mask_token_id=MASK, vocab_size=NUM_ITEMS + 1,
                                probability=0.2, seed=seed)
    else:
        model, collator = sasrec(), DataCollator("clm", padding_idx=0, seed=seed)
    eval_examples = collator.eval_examples(test_examples)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size,
                                 per_device_eval_batch_size=512, learning_rate=3e-3, warmup_steps=steps // 10,
                                 weight_decay=0.0, logging_steps=max(steps // 5, 1), save_strategy="no",
                                 report_to=[], seed=seed, use_cpu=True, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, data_collator=collator, train_dataset=train_examples,
                          eval_dataset=eval_examples)
        trainer.train()
        metrics = trainer.evaluate()
    return {"eval_loss": metrics["eval_loss"], **rank_metrics(model, collator, eval_examples),
            "log": trainer.state.log_history}


def main(steps: int = 600, batch_size: int = 64, num_train: int = 20_000, num_test: int = 1_000, seed: int = 0,
         threads: int = 1) -> dict[str, dict[str, Any]]:
    """Train both models and print recall@10 and NDCG@10; returns {name: {metric: value, "log": [...]}}."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # a model this small gains nothing from more threads
    try:
        chain = markov_chain(NUM_ITEMS, seed=seed)
        train_examples = as_examples(markov_sessions(chain, num_train, MAX_LENGTH, seed=seed + 1))
        test_examples = as_examples(markov_sessions(chain, num_test, MAX_LENGTH, seed=seed + 2))
        results = {}
        for name in ("bert4rec", "sasrec"):
            start = time.perf_counter()
            results[name] = train(name, train_examples, test_examples, steps, batch_size, seed)
            r = results[name]
            print(f"{name}: recall@10 = {r['recall@10']:.3f}  NDCG@10 = {r['ndcg@10']:.3f}  "
                  f"eval loss = {r['eval_loss']:.3f}  ({steps} steps, {time.perf_counter() - start:.0f} s)")
    finally:
        torch.set_num_threads(previous_threads)
    print(f"chance: recall@10 = {10 / NUM_ITEMS:.3f}, NDCG@10 = {sum(1 / math.log2(r + 2) for r in range(10)) / NUM_ITEMS:.3f}; "
          "a model of the chain: recall@10 about 0.9")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed, threads=args.threads)
