"""``benchmarks/gpu_check.sh``, the one command of the GPU check: its ``--tiny`` form (CPU, Triton's
interpreter, tiny shapes) runs every stage and writes the tables; a failing stage does not stop the
next ones, and the exit status says that one failed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _check(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out),
                               "GPU_CHECK_SITE": str(tmp_path / "site"), **env})
    return done, out


def test_a_failing_stage_does_not_stop_the_others(tmp_path):
    done, out = _check(tmp_path, PYTHON="false")  # every stage that runs Python fails at once
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text()
    for stage in ("env", "tests", "bench", "train", "profile"):
        assert f"{stage}: FAILED" in summary, summary


def test_stages_can_be_chosen_and_the_environment_is_written(tmp_path):
    done, out = _check(tmp_path, GPU_CHECK_STAGES="env,install")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.txt").read_text()
    assert "env: ok" in summary and "install: ok" in summary and "tests: not asked for" in summary
    versions = (out / "env.txt").read_text()
    assert "torch " in versions and "transformers " in versions


@pytest.mark.slow  # about 45 s on 2 cores: interpreted kernels in both benchmarks and a test selection
def test_the_tiny_check_runs_every_stage_and_writes_the_tables(tmp_path):
    done, out = _check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert all(f"{stage}: ok" in summary for stage in ("env", "install", "tests", "bench", "train", "profile")), summary
    for table in ("bench_gpu.md", "bench_gpu_train.md"):
        text = (out / table).read_text()
        assert "| tiny" in text and text.strip() in done.stdout
    assert " passed" in (out / "pytest.log").read_text()
    assert "host profile of 5 steps" in (out / "profile.txt").read_text()
