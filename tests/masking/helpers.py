"""Batches for the masking tests: right-padded item ids with chosen or random row lengths."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor

import seqloss.masking as masking

SCHEME_NAMES = ("clm", "mlm", "plm", "rtd")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(lengths: Sequence[int], L: int, *, vocab_size: int = 50, padding_idx: int = 0, seed: int = 0) -> Tensor:
    """(B, L) long: row b holds lengths[b] random ids from [0, vocab_size) other than padding_idx,
    then padding."""
    g = generator(seed)
    lengths_t = torch.tensor(list(lengths), dtype=torch.long)
    ids = torch.randint(0, vocab_size - 1, (len(lengths_t), L), generator=g)
    ids = ids + (ids >= padding_idx).long()  # skip the padding id
    return torch.where(torch.arange(L) < lengths_t.unsqueeze(1), ids, padding_idx)


def random_batch(B: int, L: int, *, min_length: int = 0, seed: int = 0, **kwargs) -> Tensor:
    lengths = torch.randint(min_length, L + 1, (B,), generator=generator(seed + 1))
    return batch(lengths.tolist(), L, seed=seed, **kwargs)


def lengths_of(item_ids: Tensor, padding_idx: int = 0) -> Tensor:
    return (item_ids != padding_idx).sum(dim=1)


@st.composite
def batches(draw, max_B: int = 6, max_L: int = 12) -> tuple[Tensor, int]:
    """Hypothesis: (item_ids, padding_idx) with any mix of empty, 1-item, partial and full rows."""
    L = draw(st.integers(1, max_L))
    lengths = draw(st.lists(st.integers(0, L), min_size=1, max_size=max_B))
    padding_idx = draw(st.sampled_from([0, 3]))
    seed = draw(st.integers(0, 2**16))
    return batch(lengths, L, vocab_size=20, padding_idx=padding_idx, seed=seed), padding_idx


def scheme(name: str, padding_idx: int = 0, **options) -> masking.MaskingScheme:
    return masking.get(name, padding_idx=padding_idx, **options)
