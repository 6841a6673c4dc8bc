"""The host-work counter runs end to end (tiny shape, its own process: it wraps Triton's interpreter)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_count_ops_prints_a_row_per_case_with_launches_only_for_triton():
    done = subprocess.run([sys.executable, "count_ops.py", "--shape", "1,12,8,40", "--where"], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    cases = {(r[0].strip(), r[1].strip()): [int(v) for v in r[2:]] for r in rows[1:]}
    assert len(cases) == 6
    for (objective, impl), (forward, backward, _syncs, launches, calls) in cases.items():
        assert forward > 0 and backward > 0 and calls > 0
        assert (launches > 0) == (impl == "triton"), (objective, impl)
    assert "### smile / triton" in done.stdout and "kernels/engine.py:_statistics" in done.stdout
