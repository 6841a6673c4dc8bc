"""User image folders: every bad row is an error naming file and line, or a counted skip."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from seqloss.workbench.data import load_imagefolder
from seqloss.workbench.scenes import Scene, SceneObject, write_scenes

SCENE = Scene((SceneObject("circle", "red", "small", "left"),)).to_json()


@pytest.fixture
def folder(tmp_path):
    """Two good images, one corrupt file; metadata written by the test."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return tmp_path


def _write(folder, *lines):
    (folder / "metadata.jsonl").write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")


GOOD = {"file_name": "a.png", "text": "a red square"}

BAD_ROWS = [
    ('{"file_name": "a.png", "text": ', "malformed JSON"),
    ('["a.png", "a caption"]', "expected a JSON object"),
    ({"text": "a caption"}, "missing key 'file_name'"),
    ({"file_name": "a.png"}, "missing key 'text'"),
    ({"file_name": "a.png", "text": "   "}, "empty caption"),
    ({"file_name": "a.png", "text": ["ok", ""]}, "empty caption"),
    ({"file_name": "a.png", "text": []}, "empty list"),
    ({"file_name": "a.png", "text": 3}, "must be a string"),
    ({"file_name": "missing.png", "text": "a caption"}, "does not exist"),
    ({"file_name": "broken.png", "text": "a caption"}, "not readable by Pillow"),
    ({"file_name": "a.png", "text": "a caption", "scene": {"objects": [{"shape": "cube"}]}}, "not a scene"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS)
def test_a_bad_row_is_an_error_naming_file_and_line(folder, bad, reason):
    _write(folder, GOOD, "", bad, GOOD)  # the blank line 2 is ignored but still counted
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 3: .*" + reason):
        load_imagefolder(folder)


def test_skip_bad_skips_and_prints_how_many(folder, capsys):
    _write(folder, GOOD, *[bad for bad, _ in BAD_ROWS], {"file_name": "b.png", "text": ["one", "two"]})
    records = load_imagefolder(folder, skip_bad=True)
    assert [(r.file_name, r.captions) for r in records] == [("a.png", ["a red square"]), ("b.png", ["one", "two"])]
    err = capsys.readouterr().err
    assert f"skipped {len(BAD_ROWS)} of {len(BAD_ROWS) + 2} rows" in err and "line 2: malformed JSON" in err


def test_nothing_usable_is_an_error_even_when_skipping(folder):
    _write(folder, {"file_name": "missing.png", "text": "x"})
    with pytest.raises(ValueError, match="no usable rows"):
        load_imagefolder(folder, skip_bad=True)


def test_missing_metadata_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "metadata.jsonl")):
        load_imagefolder(tmp_path)


def test_rows_of_one_image_group_in_order_with_text_lists_and_scene(folder):
    _write(folder, {"file_name": "b.png", "text": "first"}, GOOD,
           {"file_name": "b.png", "text": ["second", "third"], "scene": SCENE})
    b, a = load_imagefolder(folder)
    assert (b.file_name, b.path, b.captions) == ("b.png", folder / "b.png", ["first", "second", "third"])
    assert b.scene == Scene.from_json(SCENE) and a.scene is None


def test_reads_what_write_scenes_writes(tmp_path):
    pytest.importorskip("transformers")
    out = write_scenes(tmp_path, n=3, seed=5)
    records = load_imagefolder(out)
    assert [len(r.captions) for r in records] == [5, 5, 5]
    assert all(r.scene is not None and r.path.is_file() for r in records)
