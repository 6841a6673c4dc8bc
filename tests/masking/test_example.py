"""The next-item example runs end to end (a few steps; its learning is the example's own business)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "next_item_masking.py"


def test_next_item_example_runs(capsys):
    spec = importlib.util.spec_from_file_location("next_item_masking", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(steps=3, batch_size=16, num_train=200, num_test=50)
    assert set(results) == {"mlm", "clm"} and all(0.0 <= r <= 1.0 for r in results.values())
    printed = capsys.readouterr().out
    assert "mlm: recall@10" in printed and "clm: recall@10" in printed
