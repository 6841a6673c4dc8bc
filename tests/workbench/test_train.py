"""Training on transformers.Trainer: the patched objective trains, --resume loses nothing, and a
2-process torchrun run takes the same optimiser steps as 1 process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from transformers import TrainerCallback  # noqa: E402

from seqloss.workbench import scenes  # noqa: E402
from seqloss.workbench.model import load_captioner, new_captioner  # noqa: E402
from seqloss.workbench.settings import LossOptions, TrainSettings  # noqa: E402
from seqloss.workbench.tokenizer import scene_tokenizer  # noqa: E402
from seqloss.workbench.train import last_checkpoint, train  # noqa: E402


def _data(n=24):
    examples = scenes.generate(n, seed=3)
    return [e.image for e in examples], [e.captions for e in examples]


def _settings(**changes):
    base = dict(objective="smile", steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=0, save_steps=3,
                logging_steps=1)
    return TrainSettings(**{**base, **changes})


class StopAt(TrainerCallback):
    """Ends training after a given step, as an interruption would (the checkpoint is already saved)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def _weights(directory):
    return {k: v.detach().clone() for k, v in load_captioner(directory).model.state_dict().items()}


def test_training_lowers_the_patched_loss_and_saves_a_loadable_model(tmp_path):
    images, captions = _data()
    out = train(new_captioner(scene_tokenizer()), images, captions, _settings(steps=8, save_steps=8), tmp_path,
                progress=False)
    losses = [e["loss"] for e in out["log_history"] if "loss" in e]
    assert out["global_step"] == 8 and losses[-1] < losses[0]
    reloaded = load_captioner(tmp_path / "model")
    assert reloaded.caption(images[:2], num_beams=1, max_new_tokens=5)


def test_resume_continues_from_the_checkpoint_with_nothing_lost(tmp_path):
    images, captions = _data()
    train(new_captioner(scene_tokenizer()), images, captions, _settings(), tmp_path / "straight", progress=False)
    interrupted = tmp_path / "interrupted"
    first = train(new_captioner(scene_tokenizer()), images, captions, _settings(), interrupted, progress=False,
                  callbacks=[StopAt(3)])
    assert first["global_step"] == 3 and last_checkpoint(interrupted).endswith("checkpoint-3")
    second = train(new_captioner(scene_tokenizer(), seed=99), images, captions, _settings(), interrupted,
                   resume=True, progress=False)
    assert second["global_step"] == 6
    straight, resumed = _weights(tmp_path / "straight" / "model"), _weights(interrupted / "model")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)


def _cli_train(out, extra, launcher):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*launcher, "-m", "seqloss", "train", "--objective", "smile", "--images", "16", "--steps", "3",
               "--save-steps", "3", "--lr", "1e-3", "--out", str(out), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torchrun_two_processes_take_the_same_steps_as_one(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    two = _cli_train(tmp_path / "two", ["--batch-size", "4"], torchrun)
    one = _cli_train(tmp_path / "one", ["--batch-size", "8"], [sys.executable])
    assert "trained 3 steps" in two and "trained 3 steps" in one
    assert (tmp_path / "two" / "model" / "config.json").is_file()


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("boom")


def test_the_model_is_unpatched_when_training_fails(tmp_path):
    from seqloss import hf
    images, captions = _data(8)
    captioner = new_captioner(scene_tokenizer())
    with pytest.raises(RuntimeError, match="boom"):
        train(captioner, images, captions, _settings(steps=2), tmp_path, progress=False, callbacks=[Boom()])
    assert hf.patched_objective(captioner.model) is None


def test_subset_candidate_lists_train_on_full_batches(tmp_path):
    from seqloss import hf
    images, captions = _data(8)  # 40 captions: 5 full batches of 8
    tok = scene_tokenizer()
    candidates = tok.convert_tokens_to_ids(["a", "red", "circle", "[SEP]"])
    settings = _settings(objective="subset", steps=2, objective_options=LossOptions(include_ids=candidates))
    patched = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            patched.append(hf.patched_objective(model))

    out = train(new_captioner(tok), images, captions, settings, tmp_path, progress=False, callbacks=[Record()])
    assert out["global_step"] == 2
    assert patched[0]["objective"] == "subset" and patched[0]["options"]["include"].tolist() == [candidates] * 8
    with pytest.raises(ValueError, match="full batches"):
        train(new_captioner(tok), images[:1], captions[:1], _settings(objective="subset", steps=2, batch_size=8,
              objective_options=LossOptions(exclude_ids=[0])), tmp_path / "small", progress=False)
