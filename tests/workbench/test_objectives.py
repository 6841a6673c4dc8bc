"""Objectives as the workbench takes them: each option reaches the members that take it, and every
mistake is found on a one-token batch, before any training."""
from __future__ import annotations

import pytest
import torch

from seqloss.workbench.objectives import (
    check,
    loss_options,
    members,
    objective_name,
    options_per_objective,
    parse_objective,
    row_candidates,
    taken_by,
)
from seqloss.workbench.settings import LossOptions


@pytest.mark.parametrize("objective, given, expected", [
    ("smile", LossOptions(exclude_ids=[0], first_token_mle=False), dict(exclude_ids=[0], first_token_mle=False)),
    ("random_subset", LossOptions(num_samples=4, label_smoothing=0.1), dict(num_samples=4, label_smoothing=0.1)),
    ("reverse_subset", LossOptions(exclude_ids=[0, 1]), dict(exclude_ids=[0, 1])),
    ("selective_eos", LossOptions(), dict(eos_token_id=3)),            # the tokenizer's eos by default
    ("selective_eos", LossOptions(eos_token_id=7), dict(eos_token_id=7)),
    ("subset", LossOptions(include_ids=[4, 5]), dict(include=[4, 5])),
    ("subset", LossOptions(exclude_ids=[4]), dict(exclude=[4])),
    ({"mle": 0.5, "smile": 0.5}, LossOptions(exclude_ids=[0]), dict(exclude_ids=[0])),
    ({"smile": 0.5, "subset": 0.5}, LossOptions(exclude_ids=[2]), dict(exclude_ids=[2], exclude=[2])),
])
def test_each_option_goes_to_the_members_that_take_it(objective, given, expected):
    options = loss_options(objective, given, eos_token_id=3)
    assert options == expected
    check(objective, options, vocab_size=10)


@pytest.mark.parametrize("objective, given, message", [
    ("mle", LossOptions(exclude_ids=[0]), "takes no exclude_ids"),
    ("smile", LossOptions(eos_token_id=3), "eos_token_id is an option of selective_eos"),
    ("smile", LossOptions(num_samples=3), "takes no num_samples"),
    ("subset", LossOptions(), "subset needs exactly one of include_ids"),
    ("subset", LossOptions(include_ids=[1], exclude_ids=[2]), "subset needs exactly one"),
    ("typo", LossOptions(), "unknown objective 'typo'"),
    ({"mle": -1.0}, LossOptions(), "must be finite and >= 0"),
    ({}, LossOptions(), "at least one objective"),
])
def test_options_nobody_takes_and_unknown_objectives_are_refused(objective, given, message):
    with pytest.raises(ValueError, match=message):
        loss_options(objective, given, eos_token_id=3)


@pytest.mark.parametrize("objective, options, message", [
    ("selective_eos", dict(eos_token_id=12), "eos_token_id"),
    ("smile", dict(exclude_ids=[10]), "exclude_ids"),
    ("random_subset", dict(num_samples=0), "num_samples"),
    ("subset", dict(include=[99]), "include"),
])
def test_check_finds_what_the_library_would_refuse_at_the_first_step(objective, options, message):
    with pytest.raises(ValueError, match=message):  # the user's mistakes, however the library classes them
        check(objective, options, vocab_size=10)


def test_selective_eos_needs_an_eos_somewhere():
    options = loss_options("selective_eos", LossOptions(), eos_token_id=None)
    with pytest.raises(ValueError, match="eos_token_id"):
        check("selective_eos", options, vocab_size=10)


def test_options_per_objective_route_and_refuse_an_option_none_takes():
    given = LossOptions(exclude_ids=[0], label_smoothing=0.1)
    assert options_per_objective(["mle", "smile"], given) == [LossOptions(label_smoothing=0.1), given]
    assert taken_by({"mle": 0.5, "subset": 0.5}, given) == given
    with pytest.raises(ValueError, match="none of the objectives mle takes it"):
        options_per_objective(["mle"], LossOptions(num_samples=3))


def test_members_and_row_candidates():
    assert members({"mle": 0.01, "smile": 0.99}) == ["mle", "smile"]
    with pytest.raises(ValueError, match="mixture reads"):
        members(3)
    options, per_row = row_candidates(dict(include=[4, 5], label_smoothing=0.1), rows=3)
    assert per_row and torch.equal(options["include"], torch.tensor([[4, 5]] * 3))
    assert row_candidates(dict(exclude_ids=[0]), rows=3) == (dict(exclude_ids=[0]), False)


@pytest.mark.parametrize("text, objective", [("smile", "smile"), ("mle=0.01,smile=0.99", {"mle": 0.01, "smile": 0.99})])
def test_objectives_read_and_print_alike(text, objective):
    assert parse_objective(text) == objective and objective_name(objective) == text


@pytest.mark.parametrize("bad, message", [("mle=x", "is not a number"), ("Mle-1=0.1", "expected NAME"),
                                          ("smiel", "unknown objective 'smiel'"), ("mle=-1", "finite and >= 0"),
                                          ("mle=0.5,mle=0.5", "mle is weighted twice")])
def test_unreadable_objectives_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_objective(bad)


def test_objectives_parse_without_the_training_stack():
    # The CLI reads and checks an objective before anything heavy loads.
    import subprocess
    import sys
    code = ("import sys; from seqloss.workbench.objectives import parse_objective; parse_objective('mle=0.5,smile=0.5'); "
            "import seqloss.cli; heavy = [m for m in ('transformers', 'matplotlib', 'PIL', 'tokenizers') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
