"""Evaluation: metrics with distinct_captions, and every caption with its image's file name."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pycocoevalcap")
from PIL import Image  # noqa: E402

from seqloss.workbench import scenes  # noqa: E402
from seqloss.workbench.data import CaptionRecord  # noqa: E402
from seqloss.workbench.evaluate import EvalSet, captions_by_image, evaluate, load_images  # noqa: E402
from seqloss.workbench.model import new_captioner  # noqa: E402
from seqloss.workbench.settings import Generation  # noqa: E402
from seqloss.workbench.tokenizer import scene_tokenizer  # noqa: E402


def test_evaluate_reports_distinct_captions_and_names_each_image():
    examples = scenes.generate(3, seed=1)
    result = evaluate(new_captioner(scene_tokenizer()), EvalSet.from_examples(examples),
                      Generation(num_beams=1, max_new_tokens=4))
    metrics = result["metrics"]
    assert metrics["distinct_captions"] == len(set(result["captions"])) and 1 <= metrics["distinct_captions"] <= 3
    assert {"attribute_recall", "hallucination_rate", "bleu4", "cider"} <= set(metrics)
    assert captions_by_image(result) == [{"image": e.file_name, "caption": c}
                                         for e, c in zip(examples, result["captions"])]


def test_user_records_have_no_scene_truth_and_keep_their_names(tmp_path):
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "g.png")
    data = EvalSet.from_examples([CaptionRecord("g.png", tmp_path / "g.png", ["green"], None)])
    assert data.scenes is None and data.names == ["g.png"] and data.images[0].size == (8, 8)


def test_load_images_names_the_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.png"):
        load_images([tmp_path / "nope.png"])


def test_seqloss_evaluate_on_scenes_prints_the_position_probe(tmp_path, capsys):
    """The teacher-forced grounding probe (probe.py) is one of the metrics ``seqloss evaluate`` prints."""
    import json

    from seqloss.cli import main
    new_captioner(scene_tokenizer()).save(tmp_path / "model")
    main(["evaluate", "--model", str(tmp_path / "model"), "--images", "12", "--beams", "1"])
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
    assert 0.0 <= metrics["position_accuracy"] <= 1.0
