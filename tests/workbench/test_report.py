"""report.json / report.md: distinct captions per objective, every caption with its image's file name,
and only the columns that were measured (user data has no scene truth)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from seqloss.workbench.evaluate import EvalSet  # noqa: E402
from seqloss.workbench.report import table, write_report  # noqa: E402


def _results(with_truth):
    def metrics(distinct):
        m = dict(avg_length=3.0, distinct_words=4, distinct_captions=distinct, bleu4=0.1, cider=0.2)
        return {**m, **(dict(attribute_recall=0.5, hallucination_rate=0.1) if with_truth else {})}
    names = ["x.png", "y.png"]
    return {"mle": {"metrics": metrics(1), "captions": ["a cat", "a cat"], "images": names},
            "smile": {"metrics": metrics(2), "captions": ["a black cat", "a dog"], "images": names}}


def _evaluation():
    return EvalSet([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8), (255, 0, 0))],
                   [["a cat"], ["a dog"]], None, ["x.png", "y.png"])


def test_report_json_has_distinct_captions_and_file_names(tmp_path):
    write_report(tmp_path, _results(with_truth=False), _evaluation(), settings={})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["objectives"]["mle"]["distinct_captions"] == 1 and report["objectives"]["smile"]["distinct_captions"] == 2
    assert report["captions"]["smile"] == [{"image": "x.png", "caption": "a black cat"},
                                           {"image": "y.png", "caption": "a dog"}]
    md = (tmp_path / "report.md").read_text()
    assert "| distinct_captions |" in md and "attribute_recall" not in md   # no truth, no recall column
    assert not (tmp_path / "recall_vs_hallucination.png").exists() and (tmp_path / "examples.png").is_file()


def test_scenes_reports_show_false_facts_by_kind(tmp_path, capsys):
    results = _results(with_truth=True)
    for r in results.values():
        r["false_facts_by_kind"] = {"shape": {"stated": 2, "false": 0}, "position": {"stated": 2, "false": 1}}
    write_report(tmp_path, results, _evaluation(), settings={})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["false_facts_by_kind"]["smile"]["position"] == {"stated": 2, "false": 1}
    md = (tmp_path / "report.md").read_text()
    assert "| objective | shape | position |" in md and "| mle | 0/2 | 1/2 |" in md
    assert "| smile | 0/2 | 1/2 |" in capsys.readouterr().out


def test_table_shows_every_measured_column():
    header = table({name: r["metrics"] for name, r in _results(with_truth=True).items()}).splitlines()[0]
    assert header == ("| objective | avg_length | distinct_words | distinct_captions | attribute_recall | "
                      "hallucination_rate | bleu4 | cider |")
