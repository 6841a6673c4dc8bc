"""Generated sessions for sequential-recommendation examples and benchmarks: walks on a Markov chain.

Items are ids 1 .. num_items (0 pads). Each item has a few likely successors; the successors, the
first items and the noise items are drawn from a Zipf law over the ids, so low ids are popular and
ids come sorted by popularity (the convention of a ``"log_uniform"`` sampler). A model that learns
the chain predicts the next item well: the best possible recall@10 is about 1 - noise.

    chain = markov_chain(num_items=100_000, seed=0)
    sessions = markov_sessions(chain, count=10_000, max_length=20, seed=1)   # (count, max_length), right-padded
    examples = as_examples(sessions)                                        # [{"input_ids": [...]}, ...]
"""
from __future__ import annotations

import torch
from torch import Tensor

SUCCESSOR_PROBABILITIES = (0.6, 0.25, 0.15)


def zipf_items(count: int, num_items: int, generator: torch.Generator, exponent: float = 0.8) -> Tensor:
    """(count,) ids in 1 .. num_items with P(id) ∝ id^-exponent (inverse-CDF draws: any catalogue size)."""
    weights = torch.arange(1, num_items + 1, dtype=torch.float64).pow(-exponent)
    cdf = weights.cumsum(0)
    u = torch.rand(count, generator=generator, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=num_items - 1) + 1


def markov_chain(num_items: int, seed: int = 0) -> Tensor:
    """(num_items + 1, 3) long: the successors of each item (row 0, padding, is unused)."""
    g = torch.Generator().manual_seed(seed)
    successors = zipf_items((num_items + 1) * len(SUCCESSOR_PROBABILITIES), num_items, g)
    return successors.view(num_items + 1, len(SUCCESSOR_PROBABILITIES))


def markov_sessions(chain: Tensor, count: int, max_length: int, seed: int = 0, min_length: int = 3,
                    noise: float = 0.1) -> Tensor:
    """(count, max_length) right-padded walks of min_length .. max_length items: from a Zipf first
    item, each next item is one of the current item's successors (probabilities 0.6, 0.25, 0.15)
    or, with probability ``noise``, a Zipf-drawn item."""
    g = torch.Generator().manual_seed(seed)
    num_items = chain.shape[0] - 1
    lengths = torch.randint(min_length, max_length + 1, (count, 1), generator=g)
    items = torch.empty(count, max_length, dtype=torch.long)
    items[:, 0] = zipf_items(count, num_items, g)
    choice = torch.multinomial(torch.tensor(SUCCESSOR_PROBABILITIES), count * max_length, replacement=True,
                               generator=g).view(count, max_length)
    is_noise = torch.rand(count, max_length, generator=g) < noise
    noise_items = zipf_items(count * max_length, num_items, g).view(count, max_length)
    for i in range(1, max_length):  # a walk is sequential in time; every row steps at once
        following = chain[items[:, i - 1], choice[:, i]]
        items[:, i] = torch.where(is_noise[:, i], noise_items[:, i], following)
    return torch.where(torch.arange(max_length) < lengths, items, 0)


def as_examples(sessions: Tensor) -> list[dict[str, list[int]]]:
    """Right-padded sessions → ``[{"input_ids": [items...]}]``, the form a data collator takes."""
    return [{"input_ids": [i for i in row if i != 0]} for row in sessions.tolist()]


def transitions(sessions: Tensor) -> tuple[Tensor, Tensor]:
    """Every (current item, next item) pair of the sessions: two (M,) long tensors."""
    current, following = sessions[:, :-1], sessions[:, 1:]
    keep = following != 0
    return current[keep], following[keep]
