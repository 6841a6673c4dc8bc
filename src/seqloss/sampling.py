"""Negative samplers for ``sampled_softmax_loss``: which ids stand in for the rest of the catalogue.

A sampler draws ``K`` ids i.i.d. with replacement from a proposal q over [0, V) and reports, for each
drawn id, ``log(K · q(id))``: the log of its expected number of draws, which is what the log-Q
correction subtracts from its logit. Then ``Σ_j exp(z_j - log(K q_j))`` is an unbiased estimate of
``Σ_v exp(z_v)`` (importance sampling), which is why the corrected sampled softmax estimates the full one.

Proposals:

* ``"uniform"``: q(v) = 1 / V.
* ``"log_uniform"``: TensorFlow's ``log_uniform_candidate_sampler`` (Zipf), for ids sorted by
  decreasing popularity: q(v) = (log(v + 2) - log(v + 1)) / log(V + 1).
* ``"in_batch"``: the batch's own supervised labels, each occurrence equally likely, so
  q(v) = (occurrences of v among the T labels) / T: the in-batch negatives of two-tower
  recommenders (Yi et al., "Sampling-bias-corrected neural modeling", RecSys 2019), with their
  popularity bias measured exactly instead of estimated.
* a (V,) tensor of non-negative weights: q(v) = weight[v] / Σ weight (e.g. item counts).

Draws are made on the generator's device (CPU when there is none) and moved, as everywhere in
seqloss, so a seeded CPU generator gives the same negatives on every device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

SAMPLERS = ("uniform", "log_uniform", "in_batch")
Sampler = Union[str, Tensor]


@dataclass(frozen=True)
class Negatives:
    """Drawn negatives: ``ids`` (K,) shared by every position, or (T, K) per supervised position,
    and ``log_expected`` (same shape, fp32) = log(K · q(id)), the log-Q correction of each draw."""

    ids: Tensor
    log_expected: Tensor


def _uniform_draws(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """Float64 uniforms in [0, 1) of ``shape``, drawn on the generator's device, then moved."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def draw_negatives(sampler: Sampler, num_negatives: int, vocab_size: int, labels: Tensor, target_mask: Tensor,
                   per_position: bool, generator: Optional[torch.Generator]) -> Negatives:
    """Draw ``num_negatives`` ids per call (shared, (K,)) or per position (``per_position``: (M, K)
    for all M positions, supervised or not: shapes never depend on the data, so a traced call has
    static shapes; unsupervised rows are drawn and never used).

    ``labels`` (M,) long are the call's labels with any id (0, say) off target and ``target_mask``
    (M,) marks the supervised ones: the in-batch proposal draws from those; the other proposals only
    read the device. With ``"in_batch"`` and no supervised label the draws are label 0 of weight 0,
    never scored.
    """
    K, V, device = num_negatives, vocab_size, labels.device
    M = labels.shape[0]
    shape = (M, K) if per_position else (K,)
    u = _uniform_draws(shape, generator, device)
    if isinstance(sampler, Tensor):
        weights = sampler.to(device=device, dtype=torch.float64)
        cdf = weights.cumsum(0)
        total = cdf[-1]
        # Inverse-CDF draws: any V (torch.multinomial stops at 2^24 categories). An id of zero
        # weight is never returned: searchsorted(right=True) skips its flat step of the CDF, and a
        # draw that rounds up to the total goes to the last id of positive weight.
        last = torch.where(weights > 0, torch.arange(V, device=device), 0).max()
        ids = torch.minimum(torch.searchsorted(cdf, u * total, right=True), last)
        log_q = (weights[ids] / total).log()
    elif sampler == "uniform":
        ids = (u * V).long().clamp_(max=V - 1)
        log_q = torch.full(shape, -math.log(V), dtype=torch.float64, device=device)
    elif sampler == "log_uniform":
        # TF's inverse CDF: P(id < k) = log(k + 1) / log(V + 1).
        log_range = math.log(V + 1)
        ids = ((u * log_range).exp().floor().long() - 1).clamp_(0, V - 1)
        rank = ids.double()
        log_q = ((rank + 2).log() - (rank + 1).log()).log() - math.log(log_range)
    elif sampler == "in_batch":
        # The k-th supervised position is the first whose running count of targets exceeds k.
        supervised = target_mask.long()
        T = supervised.sum()
        k = (u * T).floor().long()
        pick = torch.searchsorted(supervised.cumsum(0), k, right=True).clamp_(max=max(M - 1, 0))
        ids = labels[pick] if M else torch.zeros(shape, dtype=torch.long, device=device)
        counts = torch.zeros(V, dtype=torch.float64, device=device).index_add_(0, labels, supervised.double())
        log_q = (counts[ids].clamp_min(1) / T.clamp_min(1)).log()
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS} or a (V,) tensor of weights, got {sampler!r}")
    return Negatives(ids.long(), (log_q + math.log(K)).float())


def proposal(sampler: Sampler, vocab_size: int, labels: Tensor) -> Tensor:
    """(V,) float64: the proposal q of ``sampler`` over every id (for tests and for teaching)."""
    V, device = vocab_size, labels.device
    if isinstance(sampler, Tensor):
        weights = sampler.to(device=device, dtype=torch.float64)
        return weights / weights.sum()
    if sampler == "uniform":
        return torch.full((V,), 1.0 / V, dtype=torch.float64, device=device)
    if sampler == "log_uniform":
        rank = torch.arange(V, dtype=torch.float64, device=device)
        return ((rank + 2).log() - (rank + 1).log()) / math.log(V + 1)
    if sampler == "in_batch":
        counts = torch.bincount(labels, minlength=V).double()
        return counts / counts.sum().clamp_min(1.0)
    raise ValueError(f"sampler must be one of {SAMPLERS} or a (V,) tensor of weights, got {sampler!r}")
