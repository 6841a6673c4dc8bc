"""Loss statistics: the extras of a loss, from what its own pass computed (no second forward).

The engines hand back each supervised position's z-loss term and its argmax over the whole
vocabulary (Liger's and Cut Cross-Entropy's extras come from their kernels' pass the same way);
this module turns them into ``seqloss.call.LossStats``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .call import Call, LossStats
from .support import targets_of


def loss_stats(loss: Tensor, z_part: Tensor, predicted: Tensor, call: Call) -> LossStats:
    """The loss, its reduced z-loss part, and the token accuracy of the argmax ids ``predicted``
    (B, N) against the shifted labels (``ignore_index`` where there is no target)."""
    t = targets_of(call.labels, call.common, call.vocab_size)
    hits = ((predicted == t.labels) & t.target_mask).sum()
    accuracy = (hits / t.target_mask.sum().clamp_min(1)).float()
    predicted_ids = torch.where(t.target_mask, predicted, call.common.ignore_index)
    return LossStats(loss, z_part, accuracy, predicted_ids.reshape(*call.lead, call.N))
