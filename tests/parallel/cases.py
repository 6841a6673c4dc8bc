"""What the ranks of a test group run, and the single-process truth it is checked against.

A ``Case`` is plain data: every rank builds the same whole batch from its seed, scores its own slice
of the vocabulary, and hands back the loss and its slice of the gradients; ``expected`` scores the
whole batch in one process with ``impl="reference"`` (the dense spec).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

import seqloss
from tests.conftest import generator, make_labels, make_logits, objective_of, options_of


@dataclass(frozen=True)
class Case:
    B: int
    N: int
    V: int
    bounds: tuple[int, ...]        # the slices' edges: rank r holds ids [bounds[r], bounds[r + 1])
    objective: str                 # a name of seqloss.OBJECTIVES or "mixture"
    seed: int = 0
    reduction: str = "mean"
    ignore_fraction: float = 0.25
    common: dict[str, Any] = field(default_factory=dict)  # plain options (no tensors)
    packed: bool = False           # position_ids: two examples per row
    token_weights: bool = False
    class_weights: bool = False
    return_stats: bool = False


def inputs(case: Case) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """The whole logits, labels and keyword options of a case (fresh: a generator is consumed by a call)."""
    logits = make_logits(case.B, case.N, case.V, seed=case.seed)
    labels = make_labels(case.B, case.N, vocab_size=case.V, seed=case.seed, ignore_fraction=case.ignore_fraction)
    options = dict(case.common, reduction=case.reduction, return_stats=case.return_stats,
                   **options_of(case.objective, labels, case.V, case.seed))
    g = generator(case.seed + 50_000)
    if case.packed:
        cut = max(1, case.N // 2)
        options["position_ids"] = torch.cat([torch.arange(cut), torch.arange(case.N - cut)]).expand(case.B, -1)
    if case.token_weights:
        options["token_weights"] = torch.rand(case.B, case.N, generator=g) * 2
    if case.class_weights:
        options["weight"] = torch.rand(case.V, generator=g) + 0.5
    return logits, labels, options


def grad_output(case: Case, loss: Tensor) -> Tensor:
    return torch.randn(loss.shape, generator=generator(case.seed + 60_000)) if loss.dim() else torch.ones(())


def _score(logits: Tensor, labels: Tensor, case: Case, options: dict[str, Any], **extra: Any) -> dict[str, Any]:
    out = seqloss.objective_loss(logits, labels, objective_of(case.objective), **options, **extra)
    loss = out.loss if case.return_stats else out
    loss.backward(grad_output(case, loss))
    result = {"loss": loss.detach()}
    if case.return_stats:
        result.update(z_loss=out.z_loss, accuracy=out.token_accuracy, predicted=out.predicted_ids)
    return result


def sharded(case: Case) -> dict[str, Any]:
    """This rank's call on its slice, through the ``vocab_parallel`` keyword."""
    rank = dist.get_rank()
    start, stop = case.bounds[rank], case.bounds[rank + 1]
    logits, labels, options = inputs(case)
    part = logits[..., start:stop].clone().requires_grad_(True)
    result = _score(part, labels, case, options, vocab_parallel=seqloss.VocabParallel(start, stop, case.V))
    return {**result, "grad": part.grad, "start": start, "stop": stop}


def expected(case: Case) -> dict[str, Any]:
    """The whole batch in one process, by the dense spec."""
    logits, labels, options = inputs(case)
    leaf = logits.clone().requires_grad_(True)
    result = _score(leaf, labels, case, {**options, "impl": "reference"})
    return {**result, "grad": leaf.grad}


def dtensor(case: Case) -> dict[str, Any]:
    """The same case with the logits a DTensor sharded on the vocabulary (torchtitan's loss_parallel layout)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    logits, labels, options = inputs(case)
    leaf = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_(True)
    result = _score(leaf, labels, case, options)
    start, stop = seqloss.VocabParallel.even(case.V).start, seqloss.VocabParallel.even(case.V).stop
    return {**result, "grad": leaf.grad.to_local(), "placements": str(leaf.grad.placements), "start": start,
            "stop": stop}


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
               "all_to_all_single")


def counted(case: Case) -> list[tuple[str, int]]:
    """The collectives one call (forward and backward) makes on this rank: (name, bytes sent) each."""
    seen: list[tuple[str, int]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name: str) -> Any:
        def collective(*args: Any, **kwargs: Any) -> Any:
            sent = [a for a in args if isinstance(a, Tensor)][-1:] if name != "all_reduce" else [args[0]]
            seen.append((name, sum(t.numel() * t.element_size() for t in sent)))
            return originals[name](*args, **kwargs)
        return collective

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        sharded(case)
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
    return seen


def head(case: Case, H: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """Hidden states (B, N, H), a head (V, H) and its bias (V,) for a case."""
    g = generator(case.seed + 70_000)
    return (torch.randn(case.B, case.N, H, generator=g), torch.randn(case.V, H, generator=g) / 2,
            torch.randn(case.V, generator=g))


def _linear(hidden: Tensor, weight: Tensor, bias: Tensor, case: Case, **extra: Any) -> dict[str, Any]:
    _, labels, options = inputs(case)
    if "weight" in options:
        options["class_weight"] = options.pop("weight")
    loss = seqloss.linear_loss(hidden, weight, labels, bias=bias, objective=objective_of(case.objective), **options,
                               **extra)
    loss.backward(grad_output(case, loss))
    return {"loss": loss.detach()}


def linear_sharded(case: Case, as_dtensor: bool) -> dict[str, Any]:
    """The fused head with this rank's rows of the weight: plain with ``vocab_parallel``, or a DTensor."""
    hidden, weight, bias = (x.requires_grad_(True) for x in head(case))
    if as_dtensor:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        rows = distribute_tensor(weight.detach(), mesh, [Shard(0)]).requires_grad_(True)
        cut = distribute_tensor(bias.detach(), mesh, [Shard(0)]).requires_grad_(True)
        result = _linear(hidden, rows, cut, case)
        shard = seqloss.VocabParallel.even(case.V)
        grads = (rows.grad.to_local(), cut.grad.to_local())
    else:
        shard = seqloss.VocabParallel(case.bounds[dist.get_rank()], case.bounds[dist.get_rank() + 1], case.V)
        rows = weight.detach()[shard.start:shard.stop].clone().requires_grad_(True)
        cut = bias.detach()[shard.start:shard.stop].clone().requires_grad_(True)
        result = _linear(hidden, rows, cut, case, vocab_parallel=shard)
        grads = (rows.grad, cut.grad)
    return {**result, "hidden": hidden.grad, "weight": grads[0], "bias": grads[1], "start": shard.start,
            "stop": shard.stop}


def linear_expected(case: Case) -> dict[str, Any]:
    hidden, weight, bias = (x.requires_grad_(True) for x in head(case))
    result = _linear(hidden, weight, bias, case, impl="reference")
    return {**result, "hidden": hidden.grad, "weight": weight.grad, "bias": bias.grad}


def step_batches(seed: int, ranks: int, micro: int, N: int = 7, V: int = 13) -> list[list[tuple[Tensor, Tensor]]]:
    """[rank][micro-batch] → (logits (2, N, V), labels (2, N)), uneven valid-token counts throughout."""
    out = []
    for r in range(ranks):
        out.append([(make_logits(2, N, V, seed=seed + 10 * r + m),
                     make_labels(2, N, vocab_size=V, seed=seed + 10 * r + m, ignore_fraction=0.1 + 0.2 * ((r + m) % 3)))
                    for m in range(micro)])
    return out


def one_step(seed: int, micro: int, objective: str) -> dict[str, Any]:
    """This rank's micro-batches, each divided by the step's global count: the rank's loss and gradients."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    mine = step_batches(seed, ranks, micro)[rank]
    count = seqloss.num_items_in_batch([labels for _, labels in mine], shift=True, group=dist.group.WORLD)
    total, grads = torch.zeros(()), []
    for logits, labels in mine:
        leaf = logits.clone().requires_grad_(True)
        loss = seqloss.objective_loss(leaf, labels, objective, shift=True, num_items_in_batch=count)
        loss.backward()
        total, grads = total + loss.detach(), grads + [leaf.grad]
    return {"loss": total, "grads": grads, "count": count}


def context(case: Case, owners: tuple[int, ...]) -> dict[str, Any]:
    """This rank's positions of every sequence (``owners[n]`` is position n's rank) with whole labels."""
    positions = [n for n, owner in enumerate(owners) if owner == dist.get_rank()]
    logits, labels, options = inputs(case)
    part = logits[:, positions].clone().requires_grad_(True)
    out = seqloss.objective_loss(part, labels, objective_of(case.objective), **options,
                                 context_parallel=seqloss.ContextParallel(torch.tensor(positions, dtype=torch.long)))
    loss = out.loss if case.return_stats else out
    whole = grad_output(case, torch.empty(case.B, case.N) if case.reduction == "none" else loss)
    loss.backward(whole[:, positions] if case.reduction == "none" else whole)
    result = {"loss": loss.detach(), "grad": part.grad, "positions": positions}
    if case.return_stats:
        result.update(z_loss=out.z_loss, accuracy=out.token_accuracy, predicted=out.predicted_ids)
    return result


def vocab_and_context(case: Case, owners: tuple[int, ...]) -> dict[str, Any]:
    """A 2 × 2 mesh: the sequence split over "cp" (``owners``), the vocabulary over "tp" (``case.bounds``)."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    cp, tp = mesh["cp"].get_local_rank(), mesh["tp"].get_local_rank()
    positions = [n for n, owner in enumerate(owners) if owner == cp]
    start, stop = case.bounds[tp], case.bounds[tp + 1]
    logits, labels, options = inputs(case)
    part = logits[:, positions, start:stop].clone().requires_grad_(True)
    loss = seqloss.objective_loss(
        part, labels, objective_of(case.objective), **options,
        vocab_parallel=seqloss.VocabParallel(start, stop, case.V, mesh["tp"].get_group()),
        context_parallel=seqloss.ContextParallel(torch.tensor(positions, dtype=torch.long), mesh["cp"].get_group()))
    whole = grad_output(case, torch.empty(case.B, case.N) if case.reduction == "none" else loss)
    loss.backward(whole[:, positions] if case.reduction == "none" else whole)
    return {"loss": loss.detach(), "grad": part.grad, "positions": positions, "start": start, "stop": stop}


def with_data_parallel(case: Case, owners: tuple[int, ...], split: str) -> dict[str, Any]:
    """A 2 × 2 mesh: rows split over "dp" (rank d takes rows d, d + 2, ...), and over the other
    dimension the positions (``split="cp"``, by ``owners``) or the vocabulary (``split="tp"``, by
    ``case.bounds``); one step's denominator counted over "dp" with ``num_items_in_batch``."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", split))
    dp, other = mesh["dp"].get_local_rank(), mesh[split].get_local_rank()
    logits, labels, options = inputs(case)
    rows = list(range(dp, case.B, 2))
    per_row = ("include", "position_ids", "token_weights")   # tensors that come with the rows
    options = {k: v[rows] if isinstance(v, Tensor) and k in per_row else v for k, v in options.items()}
    count = seqloss.num_items_in_batch(labels[rows], shift=case.common.get("shift", False),
                                       position_ids=options.get("position_ids"),
                                       token_weights=options.get("token_weights"), weight=options.get("weight"),
                                       group=mesh["dp"].get_group())
    positions, columns = list(range(case.N)), slice(0, case.V)
    if split == "cp":
        positions = [n for n, owner in enumerate(owners) if owner == other]
        extra = {"context_parallel": seqloss.ContextParallel(torch.tensor(positions, dtype=torch.long),
                                                             mesh["cp"].get_group())}
    else:
        columns = slice(case.bounds[other], case.bounds[other + 1])
        extra = {"vocab_parallel": seqloss.VocabParallel(columns.start, columns.stop, case.V, mesh["tp"].get_group())}
    part = logits[rows][:, positions][..., columns].clone().requires_grad_(True)
    loss = seqloss.objective_loss(part, labels[rows], objective_of(case.objective),
                                  **{**options, "num_items_in_batch": count}, **extra)
    loss.backward()
    return {"loss": loss.detach(), "grad": part.grad, "positions": positions, "rows": rows, "columns": columns,
            "first": other == 0}
