"""Fused LM head: forward+backward time and peak extra memory at GPT-2-small fine-tuning shapes.

Providers: Hugging Face-style full logits (``hidden @ W.T`` → ``.float()`` → ``F.cross_entropy``),
torch's ``F.linear_cross_entropy`` (reference path, and chunked with
``options=torch.nn.LinearCrossEntropyOptions()``), seqloss on materialised logits, and
``seqloss.linear_loss`` for MLE and the SMILE family. Gradients for hidden and weight. Time is the
median of ``--repeats`` rounds, providers interleaved; peak extra memory is the resident-set high-water mark of one
forward+backward in a fresh process over the inputs (it includes the gradients of hidden and weight).

    python benchmarks/bench_linear.py [--vocab 32000,50257] [--repeats 3] [--markdown FILE]
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

B, N, H = 4, 512, 768
EOS = 2  # a frequent id under the Zipf labels, standing in for the end-of-text token


def hf_full_logits(h, W, y):
    logits = (h @ W.t()).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def torch_linear_ce(chunked: bool):
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    return lambda h, W, y: F.linear_cross_entropy(h.reshape(-1, h.shape[-1]), W, y.reshape(-1), ignore_index=-100,
                                                  options=options)


def fused(objective, **options):
    return lambda h, W, y: seqloss.linear_loss(h, W, y, objective=objective, **options)


PROVIDERS: dict[str, Callable] = {
    "mle/hf full logits": hf_full_logits,
    "mle/F.linear_cross_entropy": torch_linear_ce(chunked=False),
    "mle/F.linear_cross_entropy chunked": torch_linear_ce(chunked=True),
    "mle/seqloss logits": lambda h, W, y: seqloss.cross_entropy(h @ W.t(), y),
    "mle/seqloss fused": fused("mle"),
    "smile/seqloss logits": lambda h, W, y: seqloss.smile_loss(h @ W.t(), y),
    "smile/seqloss fused": fused("smile"),
    "mle+smile/seqloss fused": fused({"mle": 0.01, "smile": 0.99}),
    "random_subset/seqloss fused": fused("random_subset"),
    "reverse_subset/seqloss fused": fused("reverse_subset"),
    "selective_eos/seqloss fused": fused("selective_eos", eos_token_id=EOS),
}


def inputs(V: int):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * H ** -0.5
    return hidden, weight, zipf_labels((B, N), V, pad_fraction=0.0)


def step(name, hidden, weight, labels):
    h = hidden.detach().requires_grad_(True)
    W = weight.detach().requires_grad_(True)
    PROVIDERS[name](h, W, labels).backward()


def measure_memory(name: str, vocab: str) -> None:
    hidden, weight, labels = inputs(int(vocab))
    with PeakRSS() as peak:
        step(name, hidden, weight, labels)
    print(json.dumps({"peak_extra": peak.extra_bytes}))


def run(V: int, repeats: int, only):
    hidden, weight, labels = inputs(V)
    names = [name for name in PROVIDERS if not only or any(name.startswith(o) for o in only)]
    ms = interleaved_median_ms({name: functools.partial(step, name, hidden, weight, labels) for name in names},
                               repeats)
    rows = []
    for name in names:
        mem = peak_extra_in_fresh_process(__file__, [name, str(V)])["peak_extra"]
        rows.append(dict(name=name, ms=ms[name], mb=mem / 2 ** 20))
    ref = {r["name"]: r for r in rows}.get("mle/hf full logits")
    out = []
    for r in rows:
        objective, provider = r["name"].split("/")
        out.append({"V": V, "objective": objective, "provider": provider, "fwd+bwd ms": f"{r['ms']:.0f}",
                    "peak extra MiB": f"{r['mb']:.0f}",
                    "speed-up vs hf": f"{ref['ms'] / r['ms']:.2f}x" if ref else "",
                    "memory vs hf": f"{r['mb'] / ref['mb']:.2f}" if ref and ref["mb"] > 0 else ""})
    return out, distinct_per_row(labels)


def main(argv=None) -> None:
    args = parser(__doc__, "--vocab", "32000,50257", repeats=3).parse_args(argv)
    if args.measure_memory:
        return measure_memory(*args.measure_memory)
    only = [o for o in args.only.split(",") if o]
    rows, notes = [], []
    for V in (int(v) for v in args.vocab.split(",")):
        vocab_rows, k = run(V, args.repeats, only)
        rows += vocab_rows
        notes.append(f"V={V}: {k:.0f} distinct label ids per row (K)")
    publish(f"Machine: {machine()}. B={B}, N={N}, H={H}, fp32, Zipf labels; median of {args.repeats} interleaved rounds of "
            f"forward+backward (gradients for hidden and weight); peak extra memory in a fresh process. "
            + "; ".join(notes) + ".", rows, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
