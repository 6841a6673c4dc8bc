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
    bench_gpu.main(["--shape", "tiny", "--logits-shape", "tiny", "--device", "cpu", "--repeats", "1",
                    "--markdown", str(tmp_path / "t.md")])
    text = capsys.readouterr().out
    for provider in [*bench_gpu.providers(), *bench_gpu.logits_providers()]:
        objective, name = provider.split("/")
        assert f"| {objective}" in text and name in text
    assert "| tiny logits" in text
    assert (tmp_path / "t.md").read_text().strip() == text.strip()
    sys.modules.pop("bench_gpu", None)


def test_flop_bound_counts_each_objectives_support(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu
    flops = bench_gpu.support_flops(torch.tensor([[1, 1, 2, -100], [-100, -100, -100, -100]]), H=1, V=10)
    # MLE: 3 positions × 10 ids; SMILE: the first position's 10 ids, then 2 positions × (2 distinct + label slot)
    assert flops == {"mle": 6.0 * 30, "smile": 6.0 * (10 + 2 * 3)}
    rows = bench_gpu.table_rows("s", [dict(name="mle/a", ms=2.0, peak=None), dict(name="smile/b", ms=1.0, peak=None)],
                                1, {"mle": 4e9, "smile": 1e9}, peak_tflops=1.0)
    assert [(r["FLOP-bound ms"], r["x bound"]) for r in rows] == [("4.00", "0.5"), ("1.00", "1.0")]
    sys.modules.pop("bench_gpu", None)


@pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None, reason="needs TRITON_INTERPRET=1")
def test_profile_gpu_prints_each_section(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import profile_gpu
    profile_gpu.main(["--shape", "tiny", "--device", "cpu", "--repeats", "1", "--rows", "3",
                      "--profile", "smile/seqloss torch", "--cprofile", "mle/seqloss torch", "--products", "13",
                      "--sweep", "16,16,16;16,16,16,1,1"])
    text = capsys.readouterr().out
    assert "## tiny smile/seqloss torch" in text and "host profile of 5 steps" in text
    assert "| 13 |" in text and "| 16 |" in text   # as given, and padded to a multiple of 8
    assert "| 16,16,16 |" in text and "| 16,16,16,1,1 |" in text
    for name in ("profile_gpu", "bench_gpu"):
        sys.modules.pop(name, None)
