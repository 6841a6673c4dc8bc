"""The checks of a vocabulary-sharded call, and the local view of sharded inputs.

A call is vocabulary-parallel when its logits are a DTensor sharded on the vocabulary (``Shard(-1)``,
as torchtitan's ``loss_parallel`` makes them), its head's weight a DTensor sharded on its rows
(``Shard(0)``, a column-parallel ``lm_head``), or when the ``vocab_parallel`` keyword says which slice
the plain tensors given are (Megatron-LM's convention). Other sharded mesh dimensions of a DTensor
(a data-parallel split of the batch) are the caller's: the loss is this rank's, as under DDP.

A call is context-parallel when the ``context_parallel`` keyword says which positions of each
sequence the scores hold; its labels (and per-position options) are whole.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from .call import ContextParallel, VocabParallel


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return None
    return DTensor


def is_dtensor(x: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(x, dtensor)


def local(x: Any) -> Any:
    """This rank's part of a DTensor (its gradient comes back with the same placements); anything else as is."""
    return x.to_local() if is_dtensor(x) else x


def dtensor_shard(x: Any, dim: int, name: str) -> Optional[VocabParallel]:
    """The vocabulary slice of a DTensor sharded on ``dim`` (the logits' last, the weight's first), or
    None when no mesh dimension shards it there."""
    if not is_dtensor(x):
        return None
    from torch.distributed.tensor import Shard
    dim = dim % x.dim()
    sharding = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim == dim]
    if not sharding:
        return None
    if len(sharding) > 1:
        raise ValueError(f"{name} is sharded on its vocabulary dimension over {len(sharding)} mesh dimensions; "
                         f"seqloss takes one (a 1-D tensor-parallel group)")
    mesh_dim = sharding[0]
    shard = VocabParallel.even(x.shape[dim], x.device_mesh.get_group(mesh_dim))
    if x.to_local().shape[dim] != shard.stop - shard.start:
        raise ValueError(f"{name}'s local shard holds {x.to_local().shape[dim]} ids where an even split of "
                         f"{x.shape[dim]} gives {shard.stop - shard.start}; seqloss takes DTensor's own even shards")
    return shard


KINDS = {"vocab_parallel": VocabParallel, "context_parallel": ContextParallel}


def check_kind(options: Mapping[str, Any]) -> None:
    """``vocab_parallel`` and ``context_parallel``, where given, are of their types."""
    for name, kind in KINDS.items():
        if options.get(name) is not None and not isinstance(options[name], kind):
            raise TypeError(f"{name} must be a seqloss.{kind.__name__} or None, got {type(options[name]).__name__}")


def _given(value: Any, name: str) -> bool:
    """Whether the keyword ``name`` is set: then of its type, with torch.distributed initialised."""
    if value is None:
        return False
    check_kind({name: value})
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{name} needs torch.distributed initialised (init_process_group) on every rank")
    return True


def check_vocab_parallel(value: Any, local_vocab: int, name: str) -> Optional[VocabParallel]:
    """The ``vocab_parallel`` keyword against the local scores' vocabulary size ``local_vocab``."""
    if not _given(value, "vocab_parallel"):
        return None
    for field in ("start", "stop", "vocab_size"):
        if not isinstance(getattr(value, field), int):
            raise TypeError(f"vocab_parallel.{field} must be an int, got {type(getattr(value, field)).__name__}")
    if not 0 <= value.start <= value.stop <= value.vocab_size or value.vocab_size < 1:
        raise ValueError(f"vocab_parallel must have 0 <= start <= stop <= vocab_size, got start={value.start}, "
                         f"stop={value.stop}, vocab_size={value.vocab_size}")
    if value.stop - value.start != local_vocab:
        raise ValueError(f"vocab_parallel says ids [{value.start}, {value.stop}) but {name} holds {local_vocab} ids")
    return value


def shard_of(scores: Any, dim: int, name: str, keyword: Any) -> tuple[Any, Optional[VocabParallel]]:
    """(this rank's part of ``scores``, its vocabulary slice or None) from a DTensor sharded on
    ``dim`` or from the ``vocab_parallel`` keyword; not both."""
    from_dtensor = dtensor_shard(scores, dim, name)
    if from_dtensor is not None and keyword is not None:
        raise ValueError(f"{name} is a DTensor sharded on the vocabulary: it says its own slice; drop vocab_parallel")
    part = local(scores)
    if from_dtensor is not None:
        return part, from_dtensor
    if isinstance(part, Tensor) and part.dim() >= 1:
        return part, check_vocab_parallel(keyword, part.shape[dim], name)
    return part, None


def local_labels(labels: Any) -> Any:
    """Labels given as a DTensor: this rank's part, unless they are split along the sequence."""
    if not is_dtensor(labels):
        return labels
    from torch.distributed.tensor import Shard
    if any(isinstance(p, Shard) and p.dim % labels.dim() == labels.dim() - 1 for p in labels.placements):
        raise ValueError("labels are sharded along the sequence: under context parallelism pass every rank the "
                         "whole sequence's labels, and context_parallel= the positions its scores hold")
    return labels.to_local()


def check_context_parallel(value: Any, labels: Any, local_positions: int, name: str) -> Optional[ContextParallel]:
    """The ``context_parallel`` keyword against whole labels (..., N) and scores holding
    ``local_positions`` positions → its positions as a long tensor on the labels' device."""
    if not _given(value, "context_parallel"):
        return None
    positions = value.positions
    if not isinstance(positions, Tensor) or positions.dim() != 1 or positions.is_floating_point():
        raise TypeError("context_parallel.positions must be a 1-D integer tensor (this rank's positions)")
    if not isinstance(labels, Tensor) or labels.dim() < 1:
        return value  # the labels' own check names the problem
    length = labels.shape[-1]
    if positions.numel() != local_positions:
        raise ValueError(f"context_parallel holds {positions.numel()} positions but {name} have {local_positions}")
    positions = positions.to(labels.device).long()
    if not torch.compiler.is_compiling() and positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= length
                              or bool((positions[1:] <= positions[:-1]).any())):
        raise ValueError(f"context_parallel.positions must be ascending positions in [0, {length}) of the whole "
                         f"sequence (labels are whole under context parallelism: (..., {length}))")
    return ContextParallel(positions, value.group)
