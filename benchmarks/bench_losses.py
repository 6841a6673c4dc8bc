"""Forward+backward time and peak extra memory of every objective on logits.

Providers: the SMILE authors' dense form of each objective (float mask → (B, N, V) copy →
masked_fill → cross_entropy), ``F.cross_entropy``, Hugging Face's ``ForCausalLMLoss`` path (upcast
to fp32, pad-and-shift the labels, cross_entropy), and seqloss (``impl="torch"``). Time is the median
of ``--repeats`` rounds, providers interleaved; peak extra memory is the resident-set high-water mark of one forward+backward
in a fresh process, over the inputs already allocated (it includes the logits' gradient, 1× the
logits). Ratios are measured in the same run.

    python benchmarks/bench_losses.py [--shapes blip,llm] [--repeats 7] [--markdown FILE]
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Callable

import torch
import torch.nn.functional as F

import seqloss
from common import (
    PeakRSS,
    distinct_per_row,
    interleaved_median_ms,
    machine,
    parser,
    peak_extra_in_fresh_process,
    publish,
    zipf_labels,
)

SHAPES = {"blip": (32, 40, 30524), "llm": (8, 128, 32000)}  # (B, N, V): BLIP captioning, a small LLM batch
EOS = 102  # BERT's [SEP], BLIP's end of caption


# --- the seed's dense forms (the SMILE authors' code, generalised to -100 labels) ----------------

def _dense(logits, labels, keep):                                   # keep: (B, N, V) 0/1 float
    z = logits.float().masked_fill(keep == 0, float("-inf"))
    return F.cross_entropy(z.view(-1, z.shape[-1]), labels.view(-1), ignore_index=-100)


def seed_smile(logits, labels):
    B, N, V = logits.shape
    clean = labels.clamp(min=0)
    keep = torch.zeros(B, V).scatter_(1, clean, 1.0).unsqueeze(1).expand(-1, N, -1).clone()
    keep[:, 0, :] = 1
    return _dense(logits, labels, keep)


def seed_random_subset(logits, labels, num_samples=10):
    B, N, V = logits.shape
    picks = torch.cat([torch.randint(V, (B, N, num_samples)), labels.clamp(min=0).unsqueeze(2)], dim=2)
    keep = torch.zeros(B, N, V).scatter_(2, picks, 1.0)
    return _dense(logits, labels, keep)


def seed_reverse_subset(logits, labels):
    B, N, V = logits.shape
    clean = labels.clamp(min=0)
    keep = torch.ones(B, V).scatter_(1, clean, 0.0).unsqueeze(1).expand(-1, N, -1).clone()
    keep.scatter_(2, clean.unsqueeze(-1), 1.0)
    return _dense(logits, labels, keep)


def seed_selective_eos(logits, labels):
    keep = torch.ones_like(logits)
    keep[..., EOS] = (labels == EOS).float()
    return _dense(logits, labels, keep)


def hf_causal_lm(logits, labels):
    """transformers' ForCausalLMLoss: upcast, pad labels with -100 and shift, mean over targets."""
    logits = logits.float()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), shifted.view(-1), ignore_index=-100)


def _include_lists(labels, V):
    g = torch.Generator().manual_seed(1)
    return torch.randint(V, (labels.shape[0], 64), generator=g)     # 64 sampled negatives per row


PROVIDERS: dict[str, Callable] = {
    "mle/F.cross_entropy": lambda z, y: F.cross_entropy(z.view(-1, z.shape[-1]), y.view(-1)),
    "mle/hf ForCausalLMLoss": hf_causal_lm,
    "mle/seqloss": lambda z, y: seqloss.cross_entropy(z, y, impl="torch"),
    "smile/seed dense": seed_smile,
    "smile/seqloss": lambda z, y: seqloss.smile_loss(z, y, impl="torch"),
    "mle+smile/seqloss": lambda z, y: seqloss.objective_loss(z, y, {"mle": 0.01, "smile": 0.99}, impl="torch"),
    "random_subset/seed dense": seed_random_subset,
    "random_subset/seqloss": lambda z, y: seqloss.random_subset_loss(z, y, impl="torch"),
    "reverse_subset/seed dense": seed_reverse_subset,
    "reverse_subset/seqloss": lambda z, y: seqloss.reverse_subset_loss(z, y, impl="torch"),
    "selective_eos/seed dense": seed_selective_eos,
    "selective_eos/seqloss": lambda z, y: seqloss.selective_eos_loss(z, y, eos_token_id=EOS, impl="torch"),
    "subset/seqloss": lambda z, y: seqloss.subset_cross_entropy(z, y, include=_include_lists(y, z.shape[-1]),
                                                                impl="torch"),
}


def inputs(shape):
    B, N, V = shape
    logits = torch.randn(B, N, V, generator=torch.Generator().manual_seed(0))
    return logits, zipf_labels((B, N), V)


def step(name, logits, labels):
    z = logits.detach().requires_grad_(True)
    PROVIDERS[name](z, labels).backward()
    return z


def measure_memory(name: str, shape_key: str) -> None:
    logits, labels = inputs(SHAPES[shape_key])
    with PeakRSS() as peak:
        step(name, logits, labels)
    print(json.dumps({"peak_extra": peak.extra_bytes, "logits_bytes": logits.numel() * logits.element_size()}))


def run(shape_key: str, repeats: int, only=None):
    logits, labels = inputs(SHAPES[shape_key])
    names = [name for name in PROVIDERS if not only or any(name.startswith(o) for o in only)]
    ms = interleaved_median_ms({name: functools.partial(step, name, logits, labels) for name in names}, repeats)
    rows = []
    for name in names:
        mem = peak_extra_in_fresh_process(__file__, [name, shape_key])
        rows.append(dict(name=name, ms=ms[name], mem=mem["peak_extra"] / mem["logits_bytes"]))
    by_name = {r["name"]: r for r in rows}
    ce = by_name.get("mle/F.cross_entropy", {}).get("ms")
    ours_ce = by_name.get("mle/seqloss", {}).get("ms")
    B, N, V = SHAPES[shape_key]
    out = []
    for r in rows:
        objective, provider = r["name"].split("/")
        seed = by_name.get(f"{objective}/seed dense", {}).get("ms")
        out.append({"shape (B, N, V)": f"{B}x{N}x{V}", "objective": objective, "provider": provider,
                    "fwd+bwd ms": f"{r['ms']:.1f}", "peak extra / logits": f"{r['mem']:.2f}",
                    "vs seed dense": f"{seed / r['ms']:.1f}x" if seed and provider == "seqloss" else "",
                    "vs F.cross_entropy": f"{ce / r['ms']:.2f}x" if ce else "",
                    "vs seqloss mle": f"{r['ms'] / ours_ce:.2f}" if ours_ce and provider == "seqloss" else ""})
    return out, distinct_per_row(labels)


def main(argv=None) -> None:
    args = parser(__doc__, "--shapes", "blip,llm", repeats=7).parse_args(argv)
    if args.measure_memory:
        return measure_memory(*args.measure_memory)
    only = [o for o in args.only.split(",") if o]
    rows, notes = [], []
    for key in args.shapes.split(","):
        shape_rows, k = run(key, args.repeats, only)
        rows += shape_rows
        notes.append(f"{key} {SHAPES[key]}: Zipf labels, {k:.0f} distinct ids per row on average")
    publish(f"Machine: {machine()}. Median of {args.repeats} interleaved rounds of forward+backward, fp32 logits; peak extra "
            f"memory in a fresh process as a multiple of the logits' size (the logits' gradient alone is "
            f"1.00). " + "; ".join(notes) + ".", rows, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
