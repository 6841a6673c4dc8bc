"""Objectives as the workbench takes them: a name or a mixture, with the options each member accepts.

The command line gives options once (``--exclude-ids 0 3``); :func:`loss_options` hands each to the
members of the objective that take it, as the keywords of :func:`seqloss.objective_loss`, and refuses
one that no member takes. :func:`check` runs the library's own validation on a one-token batch, so a
typo or an out-of-range id fails before any training starts.

``subset``'s candidates come from the command line as one list for every caption, while the library
takes one list per row of the batch (``(B, K)``): :func:`row_candidates` repeats the list over the
rows, and the trainer keeps every batch full (see ``train.py``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch

import seqloss

# CLI option -> {objective: keyword of that objective}; label_smoothing is common to all.
_ROUTES: dict[str, dict[str, str]] = {
    "eos_token_id": {"selective_eos": "eos_token_id"},
    "exclude_ids": {"smile": "exclude_ids", "random_subset": "exclude_ids", "reverse_subset": "exclude_ids",
                    "subset": "exclude"},
    "include_ids": {"subset": "include"},
    "num_samples": {"random_subset": "num_samples"},
    "first_token_mle": {"smile": "first_token_mle"},
}
_PER_ROW = ("include", "exclude")  # subset's candidates: one list per row of the batch


@dataclass
class ObjectiveOptions:
    """Options as a user gives them once for the whole objective; None = not given."""

    eos_token_id: Optional[int] = None
    exclude_ids: Optional[list[int]] = None
    include_ids: Optional[list[int]] = None
    num_samples: Optional[int] = None
    first_token_mle: Optional[bool] = None
    label_smoothing: Optional[float] = None


def members(objective: Any) -> list[str]:
    """The objective names of ``objective`` (a name or a mapping name -> weight), checked against
    ``seqloss.OBJECTIVES``; ValueError/TypeError naming what is wrong."""
    if isinstance(objective, str):
        named = {objective: 1.0}
    elif isinstance(objective, Mapping) and objective:
        named = dict(objective)
    else:
        raise TypeError(f"objective must be a name or a non-empty mapping name -> weight, got {objective!r}")
    for name, weight in named.items():
        if name not in seqloss.OBJECTIVES:
            raise ValueError(f"unknown objective {name!r}; choose from {', '.join(sorted(seqloss.OBJECTIVES))} "
                             f"or a mixture such as 'mle=0.01,smile=0.99'")
        if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"objective weight for {name!r} must be a finite number >= 0, got {weight!r}")
    return list(named)


def loss_options(objective: Any, given: Optional[ObjectiveOptions] = None,
                 eos_token_id: Optional[int] = None, strict: bool = True) -> dict[str, Any]:
    """The keyword options of ``objective`` from ``given``: JSON-ready (ids as lists).

    ``eos_token_id`` is the tokenizer's end of caption, used by ``selective_eos`` when ``given`` has
    none (with neither, it stays unset and :func:`check` refuses it). ValueError when an option is
    given that no member takes (``strict=False``: it is left out), or ``subset`` has neither or
    both of ``include_ids``/``exclude_ids``.
    """
    names = members(objective)
    options: dict[str, Any] = {}
    given = given or ObjectiveOptions()
    for field in fields(given):
        value = getattr(given, field.name)
        if value is None:
            continue
        if field.name == "label_smoothing":
            options["label_smoothing"] = value
            continue
        routes = {name: key for name, key in _ROUTES[field.name].items() if name in names}
        if not routes and not strict:
            continue
        if not routes:
            raise ValueError(f"{field.name} is an option of {', '.join(_ROUTES[field.name])}; "
                             f"the objective {'+'.join(names)} takes no {field.name}")
        for key in routes.values():
            options[key] = list(value) if isinstance(value, (list, tuple)) else value
    if "selective_eos" in names and "eos_token_id" not in options and eos_token_id is not None:
        options["eos_token_id"] = eos_token_id
    if "subset" in names and sum(key in options for key in _PER_ROW) != 1:
        raise ValueError("subset needs exactly one of include_ids (the candidates) or exclude_ids "
                         "(everything else is a candidate)")
    return options


def options_per_objective(objectives: list[Any], given: ObjectiveOptions,
                          eos_token_id: Optional[int] = None) -> list[dict[str, Any]]:
    """:func:`loss_options` of each objective compared side by side: an option goes to those that take
    it, and one that none of them takes is an error."""
    out = [loss_options(objective, given, eos_token_id, strict=False) for objective in objectives]
    names = {name for objective in objectives for name in members(objective)}
    for field in fields(given):
        if field.name in _ROUTES and getattr(given, field.name) is not None and not names & set(_ROUTES[field.name]):
            raise ValueError(f"{field.name} is an option of {', '.join(_ROUTES[field.name])}; "
                             f"none of the objectives {', '.join(sorted(names))} takes it")
    return out


def row_candidates(options: dict[str, Any], rows: int) -> tuple[dict[str, Any], bool]:
    """``options`` with subset's id lists repeated over ``rows`` rows as (rows, K) tensors, and
    whether any was (then every batch must have exactly ``rows`` rows)."""
    out = dict(options)
    per_row = False
    for key in _PER_ROW:
        if isinstance(out.get(key), (list, tuple)):
            out[key] = torch.tensor([list(out[key])] * rows, dtype=torch.long)
            per_row = True
    return out, per_row


def check(objective: Any, options: dict[str, Any], vocab_size: int) -> None:
    """Everything ``seqloss.objective_loss`` checks (names, weights, option types, ids < vocab_size),
    on a one-token batch: cheap, and before any training."""
    members(objective)
    probe, _ = row_candidates(options, 1)
    logits = torch.zeros(1, 2, vocab_size)
    labels = torch.zeros(1, 2, dtype=torch.long)
    seqloss.objective_loss(logits, labels, objective, shift=True, **probe)
