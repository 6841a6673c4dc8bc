"""The examples run (a few steps each) and their losses go down."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # what a process it spawns imports its functions from
    spec.loader.exec_module(module)
    return module


def test_finetune_gpt2_smile_trains_through_trainer():
    out = _load("finetune_gpt2_smile").main("smile", steps=8)
    losses = [entry["loss"] for entry in out["log"] if "loss" in entry]
    assert len(losses) >= 2 and losses[-1] < losses[0]


def test_patch_blip_captioner_trains_and_unpatches():
    losses = _load("patch_blip_captioner").main(steps=4)
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_recsys_trainer_trains_both_models_through_trainer():
    results = _load("recsys_trainer").main(steps=12, batch_size=16, num_train=400, num_test=60)
    assert set(results) == {"bert4rec", "sasrec"}
    for result in results.values():
        assert 0.0 <= result["ndcg@10"] <= result["recall@10"] <= 1.0
        losses = [entry["loss"] for entry in result["log"] if "loss" in entry]
        assert len(losses) >= 2 and losses[-1] < losses[0]


def test_markov_sessions_are_right_padded_walks_that_mostly_follow_the_chain():
    sessions_module = _load("markov_sessions")
    chain = sessions_module.markov_chain(500, seed=0)
    sessions = sessions_module.markov_sessions(chain, 300, 12, seed=1)
    lengths = (sessions != 0).sum(1)
    assert sessions.shape == (300, 12) and lengths.min() >= 3 and sessions.max() <= 500
    assert torch.equal(sessions != 0, torch.arange(12) < lengths.unsqueeze(1))  # right-padded
    current, following = sessions_module.transitions(sessions)
    follows_chain = (chain[current] == following.unsqueeze(1)).any(1).float().mean()
    assert follows_chain > 0.85  # 10% noise, some of which lands on a successor
    assert [len(e["input_ids"]) for e in sessions_module.as_examples(sessions)] == lengths.tolist()


def test_tensor_parallel_smile_takes_the_one_process_steps():
    out = _load("tensor_parallel_smile").main()  # TP=2 x DP=2 over 4 gloo processes, then 1 process
    assert out["parallel"] == pytest.approx(out["single"], rel=1e-5)
    assert out["single"][-1] < out["single"][0]
