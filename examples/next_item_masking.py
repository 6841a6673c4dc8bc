"""Train a tiny next-item recommender twice, with mlm and with clm targets, and compare recall@10.

Sessions are walks on a random Markov chain over items (each item has three likely successors,
plus a little noise), so the next item is learnable. The same item embeddings and output head are
put on two small Hugging Face transformers built from configs (no download):

  * mlm: ``BertModel`` (bidirectional), trained on ``seqloss.masking.get("mlm")`` targets, with the
    hidden items swapped for a learned vector by ``MaskEmbedding`` (BERT4Rec style);
  * clm: ``GPT2Model`` (causal), trained on ``seqloss.masking.get("clm")`` targets (SASRec style).

Both are evaluated the same way, with each scheme's eval mode: predict the last item of held-out
sessions from the items before it. Expect clm to learn faster: it gets a target at every position,
and its prediction of item i + 1 can read item i directly, while mlm gets a fifth of the targets
and must learn to attend to the neighbours of a hidden item (BERT4Rec is known to need long
training). Run: ``python examples/next_item_masking.py [--steps 400]``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import seqloss.masking as masking

NUM_ITEMS = 100  # item ids 1 .. NUM_ITEMS; 0 pads
MAX_LENGTH = 20
HIDDEN = 64


def markov_sessions(count: int, generator: torch.Generator, successors: Tensor) -> Tensor:
    """(count, MAX_LENGTH) right-padded sessions of 3 .. MAX_LENGTH items: from a random first item,
    each next item is one of the current item's three successors (probabilities 0.6, 0.25, 0.15)
    or, one time in ten, any item."""
    lengths = torch.randint(3, MAX_LENGTH + 1, (count, 1), generator=generator)
    items = torch.empty(count, MAX_LENGTH, dtype=torch.long)
    items[:, 0] = torch.randint(1, NUM_ITEMS + 1, (count,), generator=generator)
    choice = torch.multinomial(torch.tensor([0.6, 0.25, 0.15]), count * MAX_LENGTH, replacement=True,
                               generator=generator).view(count, MAX_LENGTH)
    noise = torch.rand(count, MAX_LENGTH, generator=generator) < 0.1
    random_items = torch.randint(1, NUM_ITEMS + 1, (count, MAX_LENGTH), generator=generator)
    for i in range(1, MAX_LENGTH):  # a walk is sequential in time; every row steps at once
        following = successors[items[:, i - 1], choice[:, i]]
        items[:, i] = torch.where(noise[:, i], random_items[:, i], following)
    return torch.where(torch.arange(MAX_LENGTH) < lengths, items, 0)


class NextItemModel(nn.Module):
    """Item embeddings -> a Hugging Face encoder (via ``inputs_embeds``) -> scores over the items
    (the embedding matrix, tied). Hidden inputs get the learned ``MaskEmbedding`` vector."""

    def __init__(self, scheme_name: str) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

        self.items = nn.Embedding(NUM_ITEMS + 1, HIDDEN, padding_idx=0)
        self.mask = masking.MaskEmbedding(HIDDEN)
        # No dropout: the generated data is plentiful, and CPU dropout would cost a tenth of a step.
        if scheme_name == "clm":
            self.encoder = GPT2Model(GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=MAX_LENGTH + 1,
                                                vocab_size=1, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                                embd_pdrop=0.0, attn_pdrop=0.0))
        else:
            self.encoder = BertModel(BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=4 * HIDDEN, max_position_embeddings=MAX_LENGTH + 1,
                                                vocab_size=1, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0), add_pooling_layer=False)

    def forward(self, out: masking.MaskingOutput) -> Tensor:
        """(B, L, NUM_ITEMS + 1) scores; position i scores the target ``out.targets[:, i]``."""
        embeddings = self.mask(self.items(out.input_ids), out.input_mask)
        attention_mask = (out.input_ids != 0) | out.input_mask
        hidden = self.encoder(inputs_embeds=embeddings, attention_mask=attention_mask.long()).last_hidden_state
        return hidden @ self.items.weight.T


def train_and_evaluate(scheme_name: str, train: Tensor, test: Tensor, steps: int, batch_size: int,
                       seed: int) -> float:
    """Train on ``scheme(batch, "train")`` targets; return recall@10 of the last item of ``test``."""
    torch.manual_seed(seed)
    scheme = masking.get("mlm", probability=0.2) if scheme_name == "mlm" else masking.get("clm")
    model = NextItemModel(scheme_name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(train), (batch_size,), generator=generator)
        out = scheme(train[rows], "train", generator=generator)
        logits = model(out)
        loss = F.cross_entropy(logits[out.target_mask], out.targets[out.target_mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = scheme(test, "eval")
        logits = model(out)[out.target_mask]
        logits[:, 0] = float("-inf")  # never recommend padding
        top10 = logits.topk(10, dim=-1).indices
        return (top10 == out.targets[out.target_mask].unsqueeze(1)).any(dim=1).float().mean().item()


def main(steps: int = 400, batch_size: int = 64, num_train: int = 20_000, num_test: int = 2_000,
         seed: int = 0, threads: int = 1) -> dict[str, float]:
    """Train both models and print their recall@10; returns {"mlm": r, "clm": r}.

    ``threads``: torch's intra-op threads while training. A model this small gains nothing from
    more, and on a busy machine each parallel op of a multi-threaded run can wait for a core
    (on a shared 2-core machine, 2 threads ran this example 15x slower than 1).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        successors = torch.randint(1, NUM_ITEMS + 1, (NUM_ITEMS + 1, 3), generator=generator)
        train = markov_sessions(num_train, generator, successors)
        test = markov_sessions(num_test, generator, successors)
        results = {}
        for name in ("mlm", "clm"):
            start = time.perf_counter()
            results[name] = train_and_evaluate(name, train, test, steps, batch_size, seed)
            print(f"{name}: recall@10 = {results[name]:.3f}  ({steps} steps, {time.perf_counter() - start:.1f} s)")
    finally:
        torch.set_num_threads(previous_threads)
    print(f"chance: recall@10 = {10 / NUM_ITEMS:.3f}; a perfect model of the chain: about 0.90")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see main)")
    args = parser.parse_args()
    main(steps=args.steps, seed=args.seed, threads=args.threads)
