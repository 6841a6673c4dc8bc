"""Benchmark of seqloss.masking: every scheme in train mode, against two peers run in the same process.

Peers:
  * plm: the same XLNet algorithm written the way the reference implementations write it (HF's
    permutation collator, Transformers4Rec's PermutationLanguageModeling): a Python loop over rows
    with a per-span ``randint`` and a per-row ``randperm``. Written here, ``plm_per_row``.
  * mlm with a [MASK] id: Hugging Face's ``DataCollatorForLanguageModeling.torch_mask_tokens`` at the
    same rate and 80/10/10 split, on a tiny word-level tokenizer built offline.

Times are medians of ``--repeats`` runs (after one warm-up), in ms, every provider of a shape timed
in turn in each round (A B A B ..., ``common.interleaved_median_ms``): timed alone in a block, a
provider keeps its memory and caches warm and looks faster than in a program that does other work
in between. Each ratio compares two timings taken in this run. Run: ``python benchmarks/bench_masking.py [--repeats 7]``.
"""
from __future__ import annotations

import argparse
import os
import platform
from typing import Callable, Optional

import torch
from torch import Tensor

import seqloss.masking as masking
from common import interleaved_median_ms

SHAPES = ((512, 50), (4096, 200))
VOCAB = 10_000
PAD, MASK = 0, 1  # the tokenizer's [PAD] and [MASK]; items are ids 3 .. VOCAB - 1


def sessions(B: int, L: int, seed: int = 0) -> Tensor:
    """(B, L) right-padded item ids, row lengths uniform in [1, L]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    lengths = torch.randint(1, L + 1, (B, 1), generator=g)
    return torch.where(torch.arange(L) < lengths, ids, PAD)


def plm_per_row(item_ids: Tensor, probability: float = 1 / 6, max_span_length: int = 5,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """seqloss's PLM algorithm (train mode) with a Python loop over rows: targets, target_mask,
    perm_mask, target_mapping."""
    B, L = item_ids.shape
    lengths = (item_ids != PAD).sum(dim=1).tolist()
    target_mask = torch.zeros(B, L, dtype=torch.bool)
    perm_mask = torch.zeros(B, L, L)
    for b, n in enumerate(lengths):
        cur = 0
        while cur < n:
            span = int(torch.randint(1, max_span_length + 1, (1,), generator=generator))
            context = int(span / probability)
            start = cur + int(torch.randint(context - span + 1, (1,), generator=generator))
            target_mask[b, start:min(start + span, n)] = True
            cur += context
        count = int(target_mask[b].sum())
        if (n >= 1 and count == 0) or (n >= 2 and count == n):
            target_mask[b, int(torch.randint(n, (1,), generator=generator))] ^= True
        rank = torch.where(target_mask[b], torch.randperm(L, generator=generator), -1)
        perm_mask[b] = ((rank.unsqueeze(1) <= rank.unsqueeze(0)) & target_mask[b]).float()
    targets = torch.where(target_mask, item_ids, -100)
    return targets, target_mask, perm_mask, torch.diag_embed(target_mask.float())


def hf_collator(mlm_probability: float):
    """``DataCollatorForLanguageModeling`` on a word-level tokenizer over VOCAB ids, built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    vocab = {"[PAD]": PAD, "[MASK]": MASK, "[UNK]": 2, **{f"item{i}": i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                        pad_token="[PAD]", mask_token="[MASK]", unk_token="[UNK]")
    return DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, return_tensors="pt")


def output_mib(out: masking.MaskingOutput) -> float:
    tensors = [t for t in vars(out).values() if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def bench_shape(B: int, L: int, repeats: int) -> list[tuple[str, str, float, float, str, Optional[float]]]:
    """Rows (scheme, shape, seqloss ms, output MiB, peer, peer ms) for one shape. Every provider of
    the shape is timed in turn in each round (A B A B ...), seqloss and peers alike."""
    item_ids = sessions(B, L)
    g = torch.Generator().manual_seed(0)
    shape = f"{B}x{L}"
    schemes = {
        "clm": masking.get("clm", padding_idx=PAD),
        "mlm (embedding-level)": masking.get("mlm", padding_idx=PAD),
        "mlm (80/10/10 ids)": masking.get("mlm", padding_idx=PAD, mask_token_id=MASK, vocab_size=VOCAB),
        "plm": masking.get("plm", padding_idx=PAD),
        "rtd": masking.get("rtd", padding_idx=PAD, mask_token_id=MASK, vocab_size=VOCAB),
    }
    rtd = schemes["rtd"]
    out = rtd(item_ids, "train", generator=g)
    logits = torch.randn(int(out.target_mask.sum()), 1000, generator=g)  # a 1000-id generator head
    collator = hf_collator(0.15)
    # HF masks its input in place: each of its runs takes a fresh copy, made before the timing.
    copies = [item_ids.clone() for _ in range(repeats + 1)]
    steps: dict[str, Callable[[], object]] = {
        name: (lambda scheme=scheme: scheme(item_ids, "train", generator=g)) for name, scheme in schemes.items()}
    steps["rtd.corrupt (T x 1000 logits)"] = lambda: rtd.corrupt(item_ids, out, logits, generator=g)
    steps["HF torch_mask_tokens"] = lambda: collator.torch_mask_tokens(
        inputs := copies.pop(), special_tokens_mask=inputs == PAD)
    steps["per-row loop"] = lambda: plm_per_row(item_ids, generator=g)
    ms = interleaved_median_ms(steps, repeats)
    peers = {"mlm (80/10/10 ids)": "HF torch_mask_tokens", "plm": "per-row loop"}
    rows = []
    for name in (*schemes, "rtd.corrupt (T x 1000 logits)"):
        mib = output_mib(schemes[name](item_ids, "train", generator=g)) if name in schemes else 0.0
        peer = peers.get(name, "")
        rows.append((name, shape, ms[name], mib, peer, ms[peer] if peer else None))
    return rows


def table(rows) -> str:
    lines = ["| scheme (train) | B x L | seqloss ms | output MiB | peer | peer ms | speed-up |",
             "|---|---|---:|---:|---|---:|---:|"]
    for name, shape, ms, mib, peer, peer_ms in rows:
        ratio = f"{peer_ms / ms:.1f}x" if peer_ms is not None else ""
        peer_cell = f"{peer_ms:.2f}" if peer_ms is not None else ""
        lines.append(f"| {name} | {shape} | {ms:.2f} | {mib:.0f} | {peer} | {peer_cell} | {ratio} |")
    return "\n".join(lines)


def machine() -> str:
    import transformers

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
            f"load average {load} at the end; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported), >= 5")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--shapes", default=",".join(f"{B}x{L}" for B, L in SHAPES),
                        help="comma-separated BxL batch shapes, e.g. 512x50,4096x200")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    rows = [row for B, L in shapes for row in bench_shape(B, L, args.repeats)]
    print(f"seqloss.masking, median of {args.repeats} interleaved runs; {machine()}\n")
    print(table(rows))
    plm = [row for row in rows if row[0] == "plm"]
    print("\nplm against the per-row loop: " + ", ".join(f"{shape} {peer_ms / ms:.1f}x"
                                                          for _, shape, ms, _, _, peer_ms in plm if peer_ms))


if __name__ == "__main__":
    main()
