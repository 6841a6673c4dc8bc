"""The GPU training-step benchmark runs end to end (a tiny Llama on CPU tensors; Triton's interpreter
for seqloss where TRITON_INTERPRET=1): every provider has a row, timed or saying why not, the MLE
providers' first-step losses agree, and the markdown file is the printed table."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu_train
    yield bench_gpu_train
    sys.modules.pop("bench_gpu_train", None)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_bench_gpu_train_prints_every_provider(bench, capsys, tmp_path):
    bench.main(["--shape", "tiny", "--device", "cpu", "--repeats", "1", "--markdown", str(tmp_path / "t.md")])
    text = capsys.readouterr().out
    header, *rows = [_cells(line) for line in text.splitlines() if line.startswith("| ")]
    rows = [dict(zip(header, row)) for row in rows]
    by_provider = {row["provider"]: row for row in rows}
    assert set(by_provider) == {p.name for p in bench.providers()}  # and no warning row
    for provider in bench.providers():
        row = by_provider[provider.name]
        if provider.missing or row["step ms"].startswith("failed"):
            assert provider.peer and row["step ms"].startswith(("skipped: ", "failed: ")), row
            continue
        assert float(row["step ms"]) > 0 and float(row["first-step loss"]) > 0, row
    # The model's own loss and seqloss's fused MLE start from the same weights and batch.
    assert float(by_provider["seqloss mle fused"]["first-step loss"]) == pytest.approx(
        float(by_provider["hf"]["first-step loss"]), rel=1e-4)
    assert (tmp_path / "t.md").read_text().strip() == text.strip()


def test_disagreeing_first_losses_give_a_warning_row(bench, capsys):
    assert bench.agreement_rows("s", {"hf": 10.0, "seqloss mle fused": 10.05}, 1e-2) == []
    rows = bench.agreement_rows("s", {"hf": 10.0, "liger": 10.0, "seqloss mle fused": 10.5}, 1e-2)
    assert [row["provider"] for row in rows] == ["warning"]
    assert "seqloss mle fused 10.50000" in rows[0]["step ms"] and "liger" not in rows[0]["step ms"]
    assert "WARNING" in capsys.readouterr().err
