"""seqloss: train sequence generators with the right objective.

Every loss is token-level cross-entropy over a per-position *support set* of vocabulary ids:
MLE (all ids), SMILE (the ids of the row's own labels), random and reverse subsetting, selective
EOS, explicit candidates, and weighted mixtures of them. See DESIGN §1 and ``seqloss.reference``.
"""
from . import masking
from ._buffers import kept_workspace_bytes, release_workspaces, set_workspace_budget
from .call import ContextParallel, LossStats, VocabParallel
from .functional import (
                         cross_entropy,
                         linear_loss,
                         objective_loss,
                         random_subset_loss,
                         reverse_subset_loss,
                         sampled_softmax_loss,
                         selective_eos_loss,
                         smile_loss,
                         subset_cross_entropy,
)
from .modules import (
                         CrossEntropyLoss,
                         LinearLoss,
                         ObjectiveLoss,
                         RandomSubsetLoss,
                         ReverseSubsetLoss,
                         SampledSoftmaxLoss,
                         SelectiveEOSLoss,
                         SmileLoss,
                         SubsetCrossEntropyLoss,
)
from .parallel.normalise import num_items_in_batch
from .support import OBJECTIVES

__version__ = "0.1.0"

__all__ = [
    "cross_entropy", "smile_loss", "random_subset_loss", "reverse_subset_loss", "selective_eos_loss",
    "subset_cross_entropy", "objective_loss", "linear_loss", "sampled_softmax_loss",
    "CrossEntropyLoss", "SmileLoss", "RandomSubsetLoss", "ReverseSubsetLoss", "SelectiveEOSLoss",
    "SubsetCrossEntropyLoss", "ObjectiveLoss", "SampledSoftmaxLoss", "LinearLoss", "LossStats", "OBJECTIVES", "VocabParallel", "ContextParallel", "num_items_in_batch",
    "masking",
    "release_workspaces", "set_workspace_budget", "kept_workspace_bytes",
]
