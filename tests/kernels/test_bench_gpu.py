"""The GPU benchmark script runs end to end (tiny shape, CPU tensors, Triton's interpreter)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from seqloss import kernels  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None, reason="needs TRITON_INTERPRET=1")
def test_bench_gpu_prints_every_provider(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu
    bench_gpu.main(["--shape", "tiny", "--device", "cpu", "--repeats", "1", "--markdown", str(tmp_path / "t.md")])
    text = capsys.readouterr().out
    for provider in bench_gpu.providers():
        objective, name = provider.split("/")
        assert f"| {objective}" in text and name in text
    assert (tmp_path / "t.md").read_text().strip() == text.strip()
    sys.modules.pop("bench_gpu", None)
