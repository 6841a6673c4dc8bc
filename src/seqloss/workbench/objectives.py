"""Objectives as the workbench takes them: parsed from text, checked by the library's own validator,
with the options each member accepts. Imports no training stack, so the CLI reads and checks an
objective before anything heavy loads.

The command line gives options once (``--exclude-ids 0 3``): ``loss_options`` hands each to the
members of the objective that take it, as the keywords of ``seqloss.objective_loss``, and refuses
one that no member takes. ``check`` runs the library's validation on a one-token batch, so a
typo or an out-of-range id fails before any training starts. Errors here are the user's: the
library's ``TypeError`` for an option that does not fit becomes a ``ValueError`` (the CLI prints
those as one line).

``subset``'s candidates come from the command line as one list for every caption, while the library
takes one list per row of the batch (``(B, K)``): ``row_candidates`` repeats the list over the
rows, and the trainer keeps every batch full (see ``train.py``).
"""
from __future__ import annotations

import re
from dataclasses import fields, replace
from typing import Any, Optional

import torch

from .. import functional
from .._validate import check_objective
from .settings import LossOptions

# LossOptions field -> {objective: keyword of that objective}; label_smoothing is common to all.
_ROUTES: dict[str, dict[str, str]] = {
    "eos_token_id": {"selective_eos": "eos_token_id"},
    "exclude_ids": {"smile": "exclude_ids", "random_subset": "exclude_ids", "reverse_subset": "exclude_ids",
                    "subset": "exclude"},
    "include_ids": {"subset": "include"},
    "num_samples": {"random_subset": "num_samples"},
    "first_token_mle": {"smile": "first_token_mle"},
}
_PER_ROW = ("include", "exclude")  # subset's candidates: one list per row of the batch


def parse_objective(text: str) -> Any:
    """'smile' → 'smile'; 'mle=0.01,smile=0.99' → {'mle': 0.01, 'smile': 0.99}; then checked."""
    if "=" not in text:
        objective: Any = text.strip()
    else:
        objective = {}
        for part in text.split(","):
            name, _, weight = part.partition("=")
            if not re.fullmatch(r"[a-z_]+", name.strip()):
                raise ValueError(f"cannot read objective {text!r}: expected NAME or NAME=WEIGHT,NAME=WEIGHT")
            if name.strip() in objective:
                raise ValueError(f"cannot read objective {text!r}: {name.strip()} is weighted twice")
            try:
                objective[name.strip()] = float(weight)
            except ValueError:
                raise ValueError(f"cannot read objective {text!r}: weight {weight!r} is not a number") from None
    members(objective)
    return objective


def objective_name(objective: Any) -> str:
    """'smile' or 'mle=0.01,smile=0.99' — also a safe directory name."""
    if isinstance(objective, str):
        return objective
    return ",".join(f"{name}={weight:g}" for name, weight in objective.items())


def members(objective: Any) -> list[str]:
    """The objective names of ``objective`` (a name or a mapping name -> weight), as the library
    checks them; a ValueError naming what is wrong."""
    try:
        return [name for _, name in check_objective(objective)]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{error} (a mixture reads 'mle=0.01,smile=0.99')") from None


def loss_options(objective: Any, given: Optional[LossOptions] = None,
                 eos_token_id: Optional[int] = None, strict: bool = True) -> dict[str, Any]:
    """The keyword options of ``objective`` from ``given``: JSON-ready (ids as lists).

    ``eos_token_id`` is the tokenizer's end of caption, used by ``selective_eos`` when ``given`` has
    none (with neither, it stays unset and ``check`` refuses it). ValueError when an option is
    given that no member takes (``strict=False``: it is left out), or ``subset`` has neither or
    both of ``include_ids``/``exclude_ids``.
    """
    names = members(objective)
    options: dict[str, Any] = {}
    given = given or LossOptions()
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


def taken_by(objective: Any, given: LossOptions) -> LossOptions:
    """``given`` without the options no member of ``objective`` takes (compare gives every objective
    the same options; each trains with those that apply to it)."""
    names = set(members(objective))
    return replace(given, **{f.name: None for f in fields(given)
                             if f.name in _ROUTES and not names & set(_ROUTES[f.name])})


def options_per_objective(objectives: list[Any], given: LossOptions) -> list[LossOptions]:
    """``taken_by`` each of the objectives compared side by side: an option that none of them
    takes is an error."""
    names = {name for objective in objectives for name in members(objective)}
    for field in fields(given):
        if field.name in _ROUTES and getattr(given, field.name) is not None and not names & set(_ROUTES[field.name]):
            raise ValueError(f"{field.name} is an option of {', '.join(_ROUTES[field.name])}; "
                             f"none of the objectives {', '.join(sorted(names))} takes it")
    out = [taken_by(objective, given) for objective in objectives]
    for objective, options in zip(objectives, out):
        loss_options(objective, options)
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
    on a one-token batch: cheap, and before any training. A wrong option is the user's: ValueError."""
    probe, _ = row_candidates(options, 1)
    logits = torch.zeros(1, 2, vocab_size)
    labels = torch.zeros(1, 2, dtype=torch.long)
    try:
        functional.objective_loss(logits, labels, objective, shift=True, **probe)
    except TypeError as error:
        raise ValueError(str(error)) from None
