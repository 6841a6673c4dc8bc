"""The examples run (a few steps each) and their losses go down."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

pytest.importorskip("transformers")
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_gpt2_smile_trains_through_trainer():
    out = _load("finetune_gpt2_smile").main("smile", steps=8)
    losses = [entry["loss"] for entry in out["log"] if "loss" in entry]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_patch_blip_captioner_trains_and_unpatches():
    losses = _load("patch_blip_captioner").main(steps=4)
    assert len(losses) == 4 and losses[-1] < losses[0]
