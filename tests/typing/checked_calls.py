"""Calls the type checker sees (``make lint`` runs mypy on this file): the keywords are typed, so a
misspelt one is an error. Each ``type: ignore[...]`` below marks a call mypy must reject: with
``warn_unused_ignores`` an ignore that no longer silences an error fails the lint."""
from __future__ import annotations

import torch

import seqloss

logits = torch.randn(2, 5, 11)
labels = torch.randint(0, 11, (2, 5))
hidden, head = torch.randn(2, 5, 4), torch.randn(11, 4)

loss: torch.Tensor = seqloss.smile_loss(logits, labels, shift=True, exclude_ids=(0,), z_loss=1e-4)
stats: seqloss.LossStats = seqloss.cross_entropy(logits, labels, return_stats=True)
fused: torch.Tensor = seqloss.linear_loss(hidden, head, labels, objective="smile", class_weight=torch.ones(11))
mixture = seqloss.objective_loss(logits, labels, {"mle": 0.01, "smile": 0.99}, token_weights=torch.ones(2, 5))
sampled = seqloss.sampled_softmax_loss(hidden, head, labels, num_negatives=3, position_ids=None)
module = seqloss.SmileLoss(first_token_mle=False, shift=True)

seqloss.smile_loss(logits, labels, shfit=True)  # type: ignore[call-overload]
seqloss.objective_loss(logits, labels, "smile", exclude_id=(0,))  # type: ignore[call-overload]
seqloss.linear_loss(hidden, head, labels, weight_decay=0.1)  # type: ignore[call-overload]
seqloss.cross_entropy(logits, labels, reduction="avg")  # type: ignore[call-overload]
seqloss.sampled_softmax_loss(hidden, head, labels, num_negatives=3, turns=True)  # type: ignore[call-arg]
seqloss.SmileLoss(shfit=True)  # type: ignore[call-arg]
