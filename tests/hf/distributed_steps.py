"""A few optimiser steps of a GPT-2 patched with ``seqloss.hf.patch(model, "smile", fused=True)``, in one
process or sharded across several: run by ``tests/hf/test_distributed.py``, not collected by pytest.

    python -m tests.hf.distributed_steps --mode single --out one.pt
    python -m torch.distributed.run --nproc_per_node 2 -m tests.hf.distributed_steps --mode fsdp --out two.pt

The global batch is the same in every mode; each of W processes takes every W-th row. Every row has
the same number of supervised tokens (a masked prompt, completion-only style), so the mean of the
processes' mean losses, which FSDP and DDP train (their gradients are averaged), is the global mean.
Rank 0 writes the losses of every step and the final full parameters to ``--out``; the single
process also writes the SMILE loss of the initial model computed on its logits by
``seqloss.smile_loss``, the loss the first step must report.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import seqloss
import seqloss.hf
from tests.hf import models

ROWS, LENGTH, PROMPT = 4, 12, 3


def batch() -> dict[str, torch.Tensor]:
    input_ids = models.ids(B=ROWS, N=LENGTH, seed=7)
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)


def tiny_gpt2(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = models.transformers.GPT2Config(vocab_size=models.V, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                            bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                            attn_pdrop=0.0, tie_word_embeddings=tied)
    return models.transformers.GPT2LMHeadModel(config)


def wrap(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode.startswith("fsdp"):
        from torch.distributed.fsdp import fully_shard
        for block in model.transformer.h:
            fully_shard(block)
        if mode == "fsdp_group":  # tied: the embeddings and the head one group (torch's advice for shared weights)
            fully_shard([model.transformer.wte, model.lm_head])
        elif mode != "fsdp":  # the head a unit of its own, its weight resharded after its forward or kept
            fully_shard(model.lm_head, reshard_after_forward=mode == "fsdp_head")
        fully_shard(model)
        return model
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def full_parameters(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    inner = model.module if mode == "ddp" else model
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in inner.named_parameters()}


def _mean_over_ranks(loss: torch.Tensor, distributed: bool, world: int) -> float:
    loss = loss.detach().clone()
    if distributed:
        dist.all_reduce(loss)
    return float(loss) / world


def zero3_steps(model: torch.nn.Module, data: dict[str, torch.Tensor], rank: int, world: int, steps: int) -> list:
    """DeepSpeed ZeRO-3 (on CPU) around the patched model: its weights, the head's included, partitioned."""
    import deepspeed
    config = {"train_micro_batch_size_per_gpu": ROWS // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                      config=config)
    local = {key: value[rank::world] for key, value in data.items()}
    losses = []
    for _ in range(steps):
        out = engine(**local)
        engine.backward(out.loss)
        engine.step()
        losses.append(_mean_over_ranks(out.loss, True, world))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "fsdp", "fsdp_head", "fsdp_head_kept", "fsdp_group", "ddp", "zero3"],
                        required=True)
    parser.add_argument("--untied", action="store_true", help="a head of its own, not the input embeddings")
    parser.add_argument("--logits", action="store_true", help="patch with fused=False (the loss on the logits)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    distributed = args.mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    data = batch()
    result: dict[str, object] = {}
    model = tiny_gpt2(tied=not args.untied)
    if rank == 0 and not distributed:
        with torch.no_grad():
            logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        result["smile_on_logits"] = float(seqloss.smile_loss(logits, data["labels"], shift=True))
    seqloss.hf.patch(model, "smile", fused=not args.logits)
    if args.mode == "zero3":
        losses = zero3_steps(model, data, rank, world, args.steps)
        parameters: dict[str, torch.Tensor] = {}
    else:
        model = wrap(model, args.mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        local = {key: value[rank::world] for key, value in data.items()}
        losses = []
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            out = model(**local)
            assert out.logits is None  # the fused head made no logits
            out.loss.backward()
            optimizer.step()
            losses.append(_mean_over_ranks(out.loss, distributed, world))
        parameters = full_parameters(model, args.mode)
    if rank == 0:
        torch.save({**result, "losses": losses, "parameters": parameters}, args.out)
    if distributed:
        dist.barrier()  # no rank leaves while another still needs it
        dist.destroy_process_group()
        # The interpreter's teardown of the engines' native threads (DeepSpeed's, gloo's) once aborted a
        # finished run ("terminate called without an active exception"): the work is done, leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
