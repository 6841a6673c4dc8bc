"""One optimiser step of a small causal LM under each objective and head: what a fine-tuner feels.

Models, built from configs (random weights, no download), fp32 on CPU, dropout off:

* ``gpt2``  — GPT-2 small's shape cut to 4 layers: H=768, 12 heads, V=50257, tied embeddings;
* ``llama`` — a Llama-shaped decoder of the same width, laid out as TinyLlama (Llama-2's 32000-token
  vocabulary, grouped-query attention): 4 layers, H=768, 12 heads (4 key/value heads), SwiGLU 2048
  wide, RMSNorm, rotary positions, untied head.

Providers, each on its own copy of the same initial weights with its own AdamW:
``hf mle`` (the model's own loss: full logits, ``ForCausalLMLoss``), ``seqloss mle fused``
(``seqloss.hf.patch(model, "mle", fused=True)``), ``smile unfused`` (``patch(model, "smile")``, on the
logits) and ``smile fused`` (``patch(model, "smile", fused=True)``).

A step is ``zero_grad(set_to_none=True)`` → forward with labels → backward → ``AdamW.step()`` on a
batch of B=4 rows of N=512 Zipf-distributed token ids, right-padded by up to 25% (labels -100,
attention mask 0 there). Time: median of ``--repeats`` rounds after one warm-up round, the
providers timed in turn in every round (A B C D A B C D ...), as the steps of a training loop
alternate with other large allocations. Memory: in a fresh process per provider, after one warm-up
step, the resident-set high-water mark of one step above the resident set before it (weights and
AdamW moments; seqloss's kept CPU workspaces are released first, so that they count in the step).
``first loss`` is each provider's loss at the warm-up step, on the same weights and batch: hf mle
and seqloss mle fused must agree, and the two SMILE providers.

The FLOP bound is the ratio of hf mle's step FLOPs to the provider's: forward+backward = 3 ×
forward, forward per token = 2 × (the body's weight matrices) + 4·L·N·H (attention scores and
values) + 2·H·V (the head) for MLE; SMILE's fused head spends 2·H·V only at each row's first
supervised position and 2·H per id of the row's token set elsewhere. The other providers do hf
mle's FLOPs (bound 1.00x). FLOPs leave out the memory passes over the (B·N, V) logits (softmax,
their gradient, the upcast), which the fused heads skip, so a measured speed-up can exceed its bound.

    python benchmarks/bench_train_step.py [--models gpt2,llama] [--repeats 5] [--quick] [--markdown FILE]
"""
from __future__ import annotations

import copy
import gc
import json
import sys
from typing import Any, Callable

import torch

import seqloss
import seqloss.hf
from common import (
    LIVE_RSS_ENV,
    PeakRSS,
    interleaved_median_ms,
    machine,
    parser,
    peak_extra_in_fresh_process,
    publish,
    zipf_labels,
)

PROVIDERS: dict[str, tuple[str, Any]] = {  # name -> (how, objective); how: "hf" or "unfused"/"fused" patch
    "hf mle": ("hf", None),
    "seqloss mle fused": ("fused", "mle"),
    "smile unfused": ("unfused", "smile"),
    "smile fused": ("fused", "smile"),
}
B, N = 4, 512
QUICK = dict(batch=2, seq_len=128, repeats=2)


def build_model(name: str) -> torch.nn.Module:
    import transformers  # the hf extra; imported here so that --help needs none

    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config).train()
    if name == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=768, num_attention_heads=12,
                                          num_key_value_heads=4, intermediate_size=2048, vocab_size=32000,
                                          max_position_embeddings=1024, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(config).train()
    raise SystemExit(f"unknown model {name!r}: choose gpt2 or llama")


def batch(vocab_size: int, rows: int, length: int) -> dict[str, torch.Tensor]:
    labels = zipf_labels((rows, length), vocab_size, pad_fraction=0.25)
    mask = labels != -100
    return {"input_ids": labels.clamp(min=0), "attention_mask": mask.long(), "labels": labels}


def provider_model(base: torch.nn.Module, name: str) -> torch.nn.Module:
    how, objective = PROVIDERS[name]
    model = copy.deepcopy(base)
    if how != "hf":
        seqloss.hf.patch(model, objective, fused=how == "fused")
    return model


def stepper(model: torch.nn.Module, inputs: dict[str, torch.Tensor], losses: list[float]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))

    return step


def flops_per_token(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Training FLOPs per token (3 × forward) of the body, the full head, and SMILE's fused head."""
    head = model.get_output_embeddings().weight
    V, H = head.shape
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} | {id(head)}
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in embeddings)
    layers, (rows, length) = model.config.num_hidden_layers, inputs["labels"].shape
    tokens = rows * length
    labels = inputs["labels"][:, 1:]
    token_sets = sum(len(set(r[r >= 0].tolist())) * int((r >= 0).sum()) for r in labels)  # Σ K·M over rows
    first = int(((labels >= 0).sum(1) > 0).sum())
    return {"body": 3 * (2 * matrices + 4 * layers * length * H), "head": 3 * 2 * H * V,
            "smile head": 3 * 2 * H * (first * V + token_sets) / tokens}


def measure_memory(provider: str, model_name: str, rows: int, length: int) -> None:
    base = build_model(model_name)
    inputs = batch(base.config.vocab_size, rows, length)
    model, losses = provider_model(base, provider), []
    del base
    step = stepper(model, inputs, losses)
    step()  # AdamW's moments exist from here on, as in a training loop
    seqloss.release_workspaces()
    gc.collect()
    with PeakRSS() as peak:
        step()
    print(json.dumps({"peak_extra": peak.extra_bytes, "state": peak.base * 1024}))


def run(model_name: str, rows: int, length: int, repeats: int, only: list[str]) -> list[dict]:
    base = build_model(model_name)
    inputs = batch(base.config.vocab_size, rows, length)
    names = [p for p in PROVIDERS if not only or any(p.startswith(o) for o in only)]
    losses: dict[str, list[float]] = {p: [] for p in names}
    steps = {p: stepper(provider_model(base, p), inputs, losses[p]) for p in names}
    flops = flops_per_token(base, inputs)
    del base
    ms = interleaved_median_ms(steps, repeats)
    del steps
    gc.collect()
    memory = {p: peak_extra_in_fresh_process(__file__, [p, model_name, "--batch", str(rows), "--seq-len", str(length)],
                                             LIVE_RSS_ENV) for p in names}
    ref_ms, ref_mb = ms.get("hf mle"), memory.get("hf mle", {}).get("peak_extra")
    full = flops["body"] + flops["head"]
    bounds = {"hf mle": 1.0, "seqloss mle fused": 1.0, "smile unfused": 1.0,
              "smile fused": full / (flops["body"] + flops["smile head"])}
    out = []
    for p in names:
        extra = memory[p]["peak_extra"]
        out.append({"model": model_name, "provider": p, "step ms": f"{ms[p]:.0f}",
                    "speed-up vs hf mle": f"{ref_ms / ms[p]:.2f}x" if ref_ms else "",
                    "FLOP bound": f"{bounds[p]:.2f}x",
                    "step peak extra MiB": f"{extra / 2 ** 20:.0f}",
                    "memory vs hf mle": f"{extra / ref_mb:.2f}" if ref_mb else "",
                    "state MiB": f"{memory[p]['state'] / 2 ** 20:.0f}",
                    "first loss": f"{losses[p][0]:.4f}"})
    return out


def main(argv=None) -> None:
    p = parser(__doc__, "--models", "gpt2,llama", repeats=5)
    p.add_argument("--batch", type=int, default=B, help="rows per batch (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=N, help="tokens per row (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: batch {QUICK['batch']}, {QUICK['seq_len']} tokens, {QUICK['repeats']} rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.repeats = QUICK["batch"], QUICK["seq_len"], QUICK["repeats"]
    if args.measure_memory:
        return measure_memory(*args.measure_memory, args.batch, args.seq_len)
    only = [o for o in args.only.split(",") if o]
    rows = []
    for name in args.models.split(","):
        rows += run(name, args.batch, args.seq_len, args.repeats, only)
    publish(f"Machine: {machine()}. One AdamW step (forward, backward, update), fp32, B={args.batch}, "
            f"N={args.seq_len}; median of {args.repeats} interleaved rounds after a warm-up round; step peak "
            f"extra = resident-set high-water mark of one step above the weights and AdamW state, in a fresh "
            f"process per provider.", rows, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
