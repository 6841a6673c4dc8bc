"""Loss statistics: the extras of a loss, from what its own pass computed (no second forward).

The engines hand back each supervised position's z-loss term and its argmax over the whole
vocabulary (Liger's and Cut Cross-Entropy's extras come from their kernels' pass the same way);
this module turns them into ``seqloss.call.LossStats``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .call import Call, LossStats
from .parallel import collectives
from .support import targets_of


def loss_stats(loss: Tensor, z_part: Tensor, predicted: Tensor, call: Call) -> LossStats:
    """The loss, its reduced z-loss part, and the token accuracy of the argmax ids ``predicted``
    (B, N) against the shifted labels (``ignore_index`` where there is no target). Under context
    parallelism ``predicted`` holds this rank's positions (and so do the ids returned); the
    accuracy is the whole batch's."""
    t = targets_of(call.labels, call.common, call.vocab_size)
    labels, mask, N = t.labels, t.target_mask, call.N
    context = call.common.context_parallel
    if context is not None:
        labels, mask, N = labels[:, context.positions], mask[:, context.positions], context.positions.numel()
    counts = torch.stack([((predicted == labels) & mask).sum(), mask.sum()]).float()
    if context is not None:
        collectives.sum_(counts, context.group)
    accuracy = counts[0] / counts[1].clamp_min(1)
    predicted_ids = torch.where(mask, predicted, call.common.ignore_index)
    return LossStats(loss, z_part, accuracy, predicted_ids.reshape(*call.lead, N))
