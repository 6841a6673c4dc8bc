"""SMILE on a tensor-parallel Llama: TP=2 × DP=2 over 4 CPU processes (gloo), the same losses as one.

A tiny Llama is built from a config. Its attention and MLP projections are split over the
tensor-parallel ranks with ``parallelize_module`` (column- then row-parallel, as torchtitan does)
and its LM head is column-parallel with its output left as a DTensor sharded on the vocabulary, so
``seqloss.smile_loss`` takes the logits of each rank's slice of the vocabulary (no gather of the
vocabulary, three (B, N) all-reduces at most). The two data-parallel ranks each take half of the
batch; ``seqloss.num_items_in_batch`` counts the step's supervised tokens over them once, so the
gradients summed over the data-parallel ranks are the one-process step's.

    python examples/tensor_parallel_smile.py           # prints the losses of 4 processes and of 1
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqloss

STEPS, BATCH, LENGTH, VOCAB = 3, 4, 16, 96


def tiny_llama() -> Any:
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = -100                                # a prompt the loss ignores
    labels[1, -3:] = -100                               # and rows of uneven length
    return ids, labels


def one_process() -> list[float]:
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, labels = batch()
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = seqloss.smile_loss(model(input_ids=ids).logits, labels, shift=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def parallelize(model: Any, tp_mesh: Any) -> Any:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                                            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                                            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                                            "mlp.down_proj": RowwiseParallel()})
    # the head column-parallel, its logits kept sharded on the vocabulary for the loss
    parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)})
    return model


def worker(rank: int, port: int, out: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize(tiny_llama(), mesh["tp"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids, labels = batch()
    dp = mesh["dp"].get_local_rank()
    mine = slice(dp * BATCH // 2, (dp + 1) * BATCH // 2)
    count = seqloss.num_items_in_batch(labels[mine], shift=True, group=mesh["dp"].get_group())  # the step's tokens
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        logits = model(input_ids=ids[mine]).logits                 # a DTensor: (B/2, N, V) sharded on V
        loss = seqloss.smile_loss(logits, labels[mine], shift=True, num_items_in_batch=count)
        loss.backward()
        for p in model.parameters():                               # sum the data-parallel ranks' gradients
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(grad, group=mesh["dp"].get_group())
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())       # the whole batch's loss
        losses.append(float(total))
    if rank == 0:
        out.put(losses)
    dist.destroy_process_group()


def four_processes() -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:  # the spawned processes import this file's worker by its module name
        sys.path.insert(0, here)
    context = mp.get_context("spawn")
    out = context.Queue()
    processes = [context.Process(target=worker, args=(rank, port, out)) for rank in range(4)]
    for p in processes:
        p.start()
    losses = out.get(timeout=300)
    for p in processes:
        p.join(timeout=60)
    return losses


def main() -> dict[str, list[float]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parallel, single = four_processes(), one_process()
    print("TP=2 x DP=2:", " ".join(f"{x:.6f}" for x in parallel))
    print("1 process:  ", " ".join(f"{x:.6f}" for x in single))
    return {"parallel": parallel, "single": single}


if __name__ == "__main__":
    sys.exit(main() and 0)
