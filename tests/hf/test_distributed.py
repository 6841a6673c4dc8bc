"""Scale-out through an existing engine: a GPT-2 patched with ``fused=True`` SMILE, sharded by FSDP
(``torch.distributed.fsdp.fully_shard``) or replicated by DDP over 2 CPU processes (gloo), takes the
same optimiser steps — the same losses, the same parameters — as 1 process on the same global batch,
and its first loss is SMILE's on the model's logits. The steps run in ``distributed_steps.py``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _native_abort(stderr: str) -> bool:
    """A rank killed by std::terminate in a native thread (DeepSpeed's or gloo's), not by a Python error:
    the run is tried once more, and what it computes is still checked."""
    return "terminate called without an active exception" in stderr and "Traceback" not in stderr.split(
        "terminate called")[0]


def _run(mode: str, out: Path, launcher: list[str], *flags: str, env: Optional[dict] = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    command = [*launcher, "-m", "tests.hf.distributed_steps", "--mode", mode, "--out", str(out), *flags]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and _native_abort(done.stderr):  # once, in CI: a rank aborted in native code
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", tmp_path_factory.mktemp("single") / "one.pt", [sys.executable])


@pytest.fixture(scope="module")
def single_untied(tmp_path_factory):
    return _run("single", tmp_path_factory.mktemp("single") / "one.pt", [sys.executable], "--untied")


def _check_same_steps(single: dict, two: dict) -> None:
    assert single["losses"][0] == pytest.approx(single["smile_on_logits"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]  # it trained
    assert two["losses"] == pytest.approx(single["losses"], rel=1e-5)
    assert two["parameters"].keys() == single["parameters"].keys()
    for name, value in single["parameters"].items():
        torch.testing.assert_close(two["parameters"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def _torchrun(port: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]


@pytest.mark.slow
@pytest.mark.parametrize("mode, port", [("fsdp", "29541"), ("ddp", "29542")])
def test_two_processes_take_the_same_steps_as_one(single, tmp_path, mode, port):
    _check_same_steps(single, _run(mode, tmp_path / "two.pt", _torchrun(port)))


def test_fsdp2_with_the_head_a_unit_of_its_own_resharded_after_forward(single_untied, tmp_path):
    # The fused loss runs inside the head's own call, where FSDP has gathered its weight.
    _check_same_steps(single_untied, _run("fsdp_head", tmp_path / "two.pt", _torchrun("29543"), "--untied"))


def test_fsdp2_with_a_tied_head_in_one_group_with_the_embeddings(single, tmp_path):
    # fully_shard([wte, lm_head]): the group's hooks gather the shared weight around the head's call too.
    _check_same_steps(single, _run("fsdp_group", tmp_path / "two.pt", _torchrun("29547")))


@pytest.mark.slow
def test_fsdp2_with_the_head_a_unit_of_its_own_kept_after_forward(single_untied, tmp_path):
    _check_same_steps(single_untied, _run("fsdp_head_kept", tmp_path / "two.pt", _torchrun("29544"), "--untied"))


@pytest.fixture(scope="module")
def deepspeed_path(tmp_path_factory):
    """DeepSpeed from the registry into a folder of its own (it builds against the installed torch;
    its CUDA extras are not needed on CPU); skipped where the registry has none."""
    target = tmp_path_factory.mktemp("deepspeed")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--target", str(target), "deepspeed", "hjson", "py-cpuinfo", "msgpack", "einops", "ninja"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "DS_BUILD_OPS": "0"})
    if done.returncode != 0:
        pytest.skip(f"deepspeed could not be installed here: {done.stderr[-300:]}")
    return target


def test_deepspeed_zero3_partitioning_the_head_takes_the_steps_of_the_loss_on_logits(single_untied, deepspeed_path,
                                                                                    tmp_path):
    # ZeRO-3 gathers the head's weight only inside its forward: the fused loss is computed there. Its
    # steps are those of the same ZeRO-3 run with the loss on the logits (DeepSpeed's optimizer step
    # is not torch's: from the second step on, both differ from one process by ~0.4%).
    env = {"PYTHONPATH": os.pathsep.join([str(deepspeed_path), str(ROOT)])}
    fused = _run("zero3", tmp_path / "fused.pt", _torchrun("29545"), "--untied", env=env)
    logits = _run("zero3", tmp_path / "logits.pt", _torchrun("29546"), "--untied", "--logits", env=env)
    assert fused["losses"] == pytest.approx(logits["losses"], rel=1e-5)
    assert fused["losses"][0] == pytest.approx(single_untied["losses"][0], rel=1e-5)
    assert fused["losses"][-1] < fused["losses"][0]
