"""A short end-to-end compare writes every report file; a second run reuses stage 1."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
from seqloss.workbench import compare as compare_module  # noqa: E402
from seqloss.workbench.compare import compare, stage1_key  # noqa: E402
from seqloss.workbench.report import COLUMNS  # noqa: E402
from seqloss.workbench.settings import CompareSettings, TrainSettings  # noqa: E402


def _tiny(objectives):
    return CompareSettings(objectives=objectives, train_images=24, test_images=4,
                           stage1=TrainSettings(steps=4, batch_size=8, warmup_steps=0, save_steps=4, logging_steps=2),
                           stage2_steps=2)


def test_compare_writes_every_report_file_and_caches_stage_one(tmp_path, capsys):
    mixture = {"mle": 0.01, "smile": 0.99}
    report = compare(tmp_path / "out", _tiny(["mle", "smile", mixture]), cache_dir=tmp_path / "cache", progress=False)
    for name in ("report.json", "report.md", "lengths.png", "recall_vs_hallucination.png", "examples.png"):
        assert (tmp_path / "out" / name).is_file(), name
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(saved["objectives"]) == {"mle", "smile", "mle=0.01,smile=0.99"} == set(report["objectives"])
    assert set(report["false_facts_by_kind"]) == set(report["objectives"])  # scenes: errors per kind of fact
    for metrics in saved["objectives"].values():
        assert set(COLUMNS) <= set(metrics)
    printed = capsys.readouterr().out
    assert "| objective |" in printed and "stage 1: training" in printed
    compare(tmp_path / "again", _tiny(["smile"]), cache_dir=tmp_path / "cache", progress=False)
    assert "stage 1: reusing" in capsys.readouterr().out


def test_stage_one_cache_key_changes_with_the_model_config(monkeypatch):
    settings = CompareSettings()
    before = stage1_key(settings)
    assert stage1_key(CompareSettings()) == before
    build = compare_module.small_blip_config

    def deeper(tokenizer, image_size):
        config = build(tokenizer, image_size)
        config.text_config.num_hidden_layers += 1
        return config

    monkeypatch.setattr(compare_module, "small_blip_config", deeper)
    assert stage1_key(settings) != before


def test_stage_one_cache_key_changes_with_how_pixels_are_normalised(monkeypatch):
    before = stage1_key(CompareSettings())
    monkeypatch.setattr(compare_module, "PIXEL_SPREAD", compare_module.PIXEL_SPREAD * 2)
    assert stage1_key(CompareSettings()) != before


@pytest.mark.slow
def test_the_default_captioner_sees_the_scenes(tmp_path):
    # The embedded default, as `make demo` runs it (minutes on 2 cores): captions differ from image to
    # image and state few false facts, and SMILE's are longer and recall more than MLE's.
    report = compare(tmp_path / "demo", CompareSettings(), cache_dir=tmp_path / "cache", progress=False)
    mle, smile = report["objectives"]["mle"], report["objectives"]["smile"]
    assert mle["hallucination_rate"] <= 0.15 and mle["attribute_recall"] >= 0.30
    positions = report["false_facts_by_kind"]["mle"]["position"]
    assert positions["false"] <= 0.3 * positions["stated"]   # it says where objects are, not a guess
    assert mle["distinct_captions"] >= 60 and smile["distinct_captions"] >= 60
    assert smile["avg_length"] >= 1.5 * mle["avg_length"]
    assert smile["attribute_recall"] >= mle["attribute_recall"] + 0.15
