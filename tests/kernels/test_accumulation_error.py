"""The accumulation-error model runs end to end and shows what it is for (tiny shape)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_a_bf16_accumulator_of_many_tiles_is_further_off_than_the_dense_head_and_fp32_is_not():
    done = subprocess.run([sys.executable, "accumulation_error.py", "--vocab", "8192", "--positions", "256",
                           "--hidden", "32", "--trials", "1"], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in done.stdout.splitlines()
            if line.startswith("| hidden") or line.startswith("| weight")}
    assert rows["hidden, bf16 accumulator"] > 3 * rows["hidden, dense bf16 head"]
    assert rows["hidden, fp32 accumulator"] < 1.5 * rows["hidden, dense bf16 head"]
