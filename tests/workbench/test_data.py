"""User image folders: every bad row is an error naming file and line, or a counted skip."""
from __future__ import annotations

import json
from pathlib import Path

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


# --- BLIP caption JSON and COCO captions JSON ------------------------------------------------------

from seqloss.workbench.data import (  # noqa: E402
    DEFAULT_EVAL_FRACTION,
    CaptionRecord,
    load_captions,
    load_split,
    open_image,
    split_by_image,
)


def _json(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


BLIP_GOOD = [{"image": "a.png", "caption": "a red square", "image_id": "a"},
             {"image": "b.png", "caption": ["one", "two"]},  # BLIP's val/test files: a list of captions
             {"image": "a.png", "caption": "another"}]

BAD_BLIP_ENTRIES = [
    ("not an object", "expected a JSON object"),
    ({"caption": "x"}, "missing key 'image'"),
    ({"image": "a.png"}, "missing key 'caption'"),
    ({"image": "a.png", "caption": " "}, "empty caption"),
    ({"image": "a.png", "caption": []}, "empty list"),
    ({"image": 7, "caption": "x"}, "image name must be a non-empty string"),
    ({"image": "missing.png", "caption": "x"}, "does not exist .*--image-root"),
    ({"image": "broken.png", "caption": "x"}, "not readable by Pillow"),
]


def test_blip_json_groups_an_images_captions(folder):
    records = load_captions(_json(folder / "train.json", BLIP_GOOD))
    assert [(r.file_name, r.path, r.captions) for r in records] == [
        ("a.png", folder / "a.png", ["a red square", "another"]), ("b.png", folder / "b.png", ["one", "two"])]


def test_blip_json_images_resolve_against_the_image_root(folder, tmp_path_factory):
    annotations = tmp_path_factory.mktemp("annotations")
    path = _json(annotations / "coco_karpathy_train.json", BLIP_GOOD)
    with pytest.raises(ValueError, match=r"coco_karpathy_train\.json, entry 0: .*does not exist"):
        load_captions(path)
    assert [r.path for r in load_captions(path, image_root=folder)] == [folder / "a.png", folder / "b.png"]


@pytest.mark.parametrize("bad, reason", BAD_BLIP_ENTRIES)
def test_a_bad_blip_entry_names_file_and_index(folder, bad, reason):
    path = _json(folder / "train.json", [BLIP_GOOD[0], bad])
    with pytest.raises(ValueError, match=r"train\.json, entry 1: .*" + reason):
        load_captions(path)


def test_bad_blip_entries_are_skipped_and_counted(folder, capsys):
    path = _json(folder / "train.json", BLIP_GOOD + [bad for bad, _ in BAD_BLIP_ENTRIES])
    assert [r.file_name for r in load_captions(path, skip_bad=True)] == ["a.png", "b.png"]
    assert f"skipped {len(BAD_BLIP_ENTRIES)} of {len(BAD_BLIP_ENTRIES) + 3} entries" in capsys.readouterr().err


COCO_GOOD = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
             "annotations": [{"id": 10, "image_id": 2, "caption": "b first"}, {"id": 11, "image_id": 1, "caption": "a one"},
                             {"id": 12, "image_id": 2, "caption": "b second"}]}


def _coco(images=(), annotations=()):
    return {"images": COCO_GOOD["images"] + list(images), "annotations": COCO_GOOD["annotations"] + list(annotations)}


BAD_COCO = [
    (_coco(images=[{"file_name": "c.png"}]), r"images\[2\]: missing key 'id'"),
    (_coco(images=[{"id": 1, "file_name": "b.png"}]), r"images\[2\]: duplicate image id 1"),
    (_coco(images=[{"id": 3, "file_name": "missing.png"}], annotations=[{"image_id": 3, "caption": "x"}]),
     r"images\[2\] \(id 3\): .*does not exist"),
    (_coco(images=[{"id": 3, "file_name": "broken.png"}], annotations=[{"image_id": 3, "caption": "x"}]),
     r"images\[2\] \(id 3\): .*not readable by Pillow"),
    (_coco(images=[{"id": 3, "file_name": "a.png"}]), r"images\[2\] \(id 3\): no caption"),
    (_coco(annotations=[{"id": 13, "image_id": 99, "caption": "x"}]), r"annotations\[3\] \(id 13\): image_id 99"),
    (_coco(annotations=[{"id": 14, "image_id": 1, "caption": ""}]), r"annotations\[3\] \(id 14\): empty caption"),
    (_coco(annotations=[{"image_id": 1}]), r"annotations\[3\]: missing key 'caption'"),
]


def test_coco_json_reads_images_in_their_order_with_their_captions(folder):
    records = load_captions(_json(folder / "captions_train.json", COCO_GOOD))
    assert [(r.file_name, r.captions) for r in records] == [("a.png", ["a one"]), ("b.png", ["b first", "b second"])]


@pytest.mark.parametrize("data, where", BAD_COCO)
def test_a_bad_coco_entry_names_file_and_entry(folder, data, where):
    with pytest.raises(ValueError, match=r"captions\.json, " + where):
        load_captions(_json(folder / "captions.json", data))


def test_bad_coco_entries_are_skipped_and_counted(folder, capsys):
    data = _coco(images=[{"id": 3, "file_name": "broken.png"}, {"id": 4, "file_name": "a.png"}],
                 annotations=[{"image_id": 3, "caption": "x"}, {"image_id": 99, "caption": "x"}])
    records = load_captions(_json(folder / "captions.json", data), skip_bad=True)
    assert [r.file_name for r in records] == ["a.png", "b.png"]
    assert "skipped 3 of 9 entries" in capsys.readouterr().err


@pytest.mark.parametrize("content, reason", [
    ("{not json", r"malformed JSON \(.* line 1"),
    ({"images": []}, "expected BLIP caption JSON .* or COCO captions JSON"),
    ("3", "got int"),
])
def test_unreadable_json_files_are_named(folder, content, reason):
    path = _json(folder / "data.json", content)
    with pytest.raises(ValueError, match=r"data\.json.*" + reason):
        load_captions(path)


def test_the_path_picks_the_reader_and_names_what_it_expected(folder):
    _write(folder, GOOD)
    assert [r.file_name for r in load_captions(folder)] == ["a.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_captions(folder / "nothing.json")
    with pytest.raises(ValueError, match="expected an image folder with metadata.jsonl or a .json"):
        load_captions(folder / "a.png")
    with pytest.raises(ValueError, match="image_root applies to JSON"):
        load_captions(folder, image_root=folder)


def test_open_image_names_the_file(folder):
    assert open_image(folder / "a.png").mode == "RGB"
    with pytest.raises(ValueError, match="broken.png"):
        open_image(folder / "broken.png")


# --- the held-out split ----------------------------------------------------------------------------

def _records(n):
    return [CaptionRecord(f"{i:03d}.png", Path(f"/x/{i:03d}.png"), [f"caption {i}"], None) for i in range(n)]


def test_split_is_by_image_deterministic_and_independent_of_order():
    records = _records(50)
    train, held = split_by_image(records, 0.2, seed=1)
    assert len(held) == 10 and len(train) == 40 and not {r.file_name for r in train} & {r.file_name for r in held}
    assert [r.file_name for r in train] == sorted(r.file_name for r in train)  # the records' order is kept
    again = split_by_image(list(reversed(records)), 0.2, seed=1)[1]
    assert {r.file_name for r in again} == {r.file_name for r in held}
    assert {r.file_name for r in split_by_image(records, 0.2, seed=2)[1]} != {r.file_name for r in held}
    assert split_by_image(records, 0.0) == (records, [])
    assert len(split_by_image(_records(3), 0.01)[1]) == 1  # at least one image held out


@pytest.mark.parametrize("fraction", [1.0, -0.1, "0.1", True])
def test_split_refuses_a_bad_fraction(fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
        split_by_image(_records(5), fraction)


def test_split_refuses_to_hold_out_everything():
    with pytest.raises(ValueError, match="cannot hold out"):
        split_by_image(_records(1), 0.5)


def test_load_split_holds_out_part_of_the_data_or_uses_eval_data(folder, tmp_path_factory, capsys):
    other = tmp_path_factory.mktemp("other")
    Image.new("RGB", (8, 8)).save(other / "c.png")
    _json(other / "val.json", [{"image": "c.png", "caption": "held out"}])
    _write(folder, GOOD, {"file_name": "b.png", "text": "b"})
    train, held = load_split(folder, eval_fraction=0.5)
    assert len(train) == len(held) == 1
    assert DEFAULT_EVAL_FRACTION == 0.1 and len(load_split(folder)[1]) == 1
    train, held = load_split(folder, eval_data=other / "val.json")
    assert [r.file_name for r in train] == ["a.png", "b.png"] and [r.file_name for r in held] == ["c.png"]
    with pytest.raises(ValueError, match="not both"):
        load_split(folder, eval_data=other / "val.json", eval_fraction=0.1)
    load_split(folder, eval_data=folder)
    assert "2 of the 2 images" in capsys.readouterr().err
