"""The workbench CLI's shared argument groups and argument types (``cli.py`` builds the commands
from them): the data a command reads, the objective's options, decoding."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Optional


def token_ids(text: str) -> list[int]:
    """'0,3 7' -> [0, 3, 7]."""
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected token ids (integers), got {text!r}") from None


def _number(text: str, convert: Callable[[str], Any], accept: Callable[[Any], bool], expected: str) -> Any:
    """``convert(text)`` if it reads and ``accept`` takes it, else argparse's error naming ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def count(text: str) -> int:
    """A number of steps, images, rows, ...: an integer >= 1 (Hugging Face reads max_steps <= 0 as
    'train by epochs', and an empty data set fails far from the option that made it)."""
    return _number(text, int, lambda v: v >= 1, "a whole number >= 1")


def rate(text: str) -> float:
    """A learning rate: a finite number > 0."""
    return _number(text, float, lambda v: 0 < v < float("inf"), "a number > 0")


def add_data_options(q: argparse.ArgumentParser, images: Optional[int]) -> None:
    g = q.add_argument_group("data")
    g.add_argument("--data", default="scenes", metavar="PATH",
                   help="'scenes' (generated, the default), an image folder with metadata.jsonl (file_name, text), "
                        "a BLIP caption JSON file ([{\"image\", \"caption\"}]) or a COCO captions JSON file "
                        "(images + annotations)")
    g.add_argument("--image-root", metavar="DIR", help="where the images of a JSON file are (default: its folder)")
    g.add_argument("--eval-fraction", type=fraction, metavar="F",
                   help="your data: the fraction of its images held out for evaluation, chosen by image from "
                        "--split-seed (default: 0.1; 0 keeps none)")
    g.add_argument("--eval-data", metavar="PATH",
                   help="your data: held-out images from here instead (same formats); training then uses all of --data")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (default: %(default)s)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip bad entries of your data (missing images, empty captions, ...) and count them, "
                        "instead of stopping at the first")
    if images is not None:
        g.add_argument("--images", type=count, default=images, help="scenes: how many to generate (default: %(default)s)")


def add_objective_options(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("objective options (each goes to the objectives that take it)")
    g.add_argument("--eos-token-id", type=int, metavar="ID",
                   help="selective_eos: the end-of-caption id left out of the softmax except where it is the label "
                        "(default: the id that ends a caption, the tokenizer's [SEP] as in BLIP)")
    g.add_argument("--exclude-ids", type=token_ids, nargs="+", metavar="IDS",
                   help="ids left out of the support, e.g. '0 5': exclude_ids of smile, random_subset and "
                        "reverse_subset; subset's exclude (the same ids for every caption)")
    g.add_argument("--include-ids", type=token_ids, nargs="+", metavar="IDS",
                   help="subset: the candidate ids of every caption (each position's label is always added)")
    g.add_argument("--num-samples", type=count, metavar="K", help="random_subset: ids drawn per position (default: 10)")
    g.add_argument("--first-token-mle", action=argparse.BooleanOptionalAction, default=None,
                   help="smile: score the first word over the whole vocabulary (default: on)")
    g.add_argument("--label-smoothing", type=float, metavar="EPS",
                   help="spread over each position's support (default: the model's own; 0 for a new model)")


def add_decoding(q: argparse.ArgumentParser) -> None:
    q.add_argument("--beams", type=count, default=3, help="beam search width (default: %(default)s)")
    q.add_argument("--top-p", type=float, default=None, help="nucleus sampling instead of beam search")
