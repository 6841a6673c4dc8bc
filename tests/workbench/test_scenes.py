"""The scenes data set: deterministic, drawn where its truth says, captions partial and in-vocabulary."""
from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest

from seqloss.workbench import scenes
from seqloss.workbench.scenes import Scene, SceneObject


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_gives_identical_png_bytes_and_captions():
    a, b = scenes.generate(6, seed=7), scenes.generate(6, seed=7)
    assert [_png(x.image) for x in a] == [_png(x.image) for x in b]
    assert [x.captions for x in a] == [x.captions for x in b]
    assert [x.scene for x in a] == [x.scene for x in b]


def test_different_seeds_differ_and_smaller_n_is_a_prefix():
    a, b = scenes.generate(6, seed=0), scenes.generate(6, seed=1)
    assert [_png(x.image) for x in a] != [_png(x.image) for x in b]
    assert [x.captions for x in a] != [x.captions for x in b]
    assert [_png(x.image) for x in scenes.generate(3, seed=0)] == [_png(x.image) for x in a[:3]]


def test_scenes_hold_one_to_max_objects_with_distinct_shapes_and_cells():
    rng = random.Random(0)
    drawn = [scenes.make_scene(rng) for _ in range(300)]
    assert Counter(len(s.objects) for s in drawn).keys() == set(range(1, scenes.MAX_OBJECTS + 1))
    for s in drawn:
        assert len({o.shape for o in s.objects}) == len({o.position for o in s.objects}) == len(s.objects)


def test_captions_are_lowercase_in_vocabulary_and_mention_a_true_object():
    rng = random.Random(1)
    mentioned = Counter()
    for _ in range(200):
        scene = scenes.make_scene(rng)
        refs = scenes.captions(scene, rng)
        assert len(refs) == 5
        for caption in refs:
            words = caption.split()
            assert caption == " ".join(words) == caption.lower()
            assert set(words) <= set(scenes.VOCABULARY)
            shapes = [w for w in words if w in scenes.SHAPES]
            assert shapes and set(shapes) <= {o.shape for o in scene.objects}
            mentioned[min(len(shapes), 3)] += 1
    total = sum(mentioned.values())
    assert mentioned[1] / total > 0.5 and mentioned[2] / total > 0.15 and mentioned[3] > 0  # mostly partial


def _ink(image) -> np.ndarray:
    """(H, W) True where a pixel is clearly not background."""
    return (np.asarray(image, dtype=np.int16) < 200).any(axis=-1)


@pytest.mark.parametrize("position, cell", [("left", (0, 1)), ("right", (2, 1)), ("top", (1, 0)),
                                            ("bottom", (1, 2)), ("center", (1, 1))])
def test_an_object_is_drawn_inside_the_cell_its_position_names(position, cell):
    for seed in range(5):
        scene = Scene((SceneObject("square", "blue", "large", position),))
        image = scenes.draw(scene, 96, random.Random(seed))
        ys, xs = np.nonzero(_ink(image))
        assert xs.min() >= cell[0] * 32 and xs.max() < (cell[0] + 1) * 32
        assert ys.min() >= cell[1] * 32 and ys.max() < (cell[1] + 1) * 32


def test_large_is_about_twice_small_and_draw_is_rgb():
    widths = {}
    for size in scenes.SIZES:
        image = scenes.draw(Scene((SceneObject("circle", "red", size, "center"),)), 64)
        assert image.mode == "RGB" and image.size == (64, 64)
        xs = np.nonzero(_ink(image).any(axis=0))[0]
        widths[size] = xs.max() - xs.min() + 1
    assert 1.6 <= widths["large"] / widths["small"] <= 2.4


def test_scene_json_round_trip_and_validation():
    scene = scenes.make_scene(random.Random(3))
    assert Scene.from_json(json.loads(json.dumps(scene.to_json()))) == scene
    with pytest.raises(ValueError, match="colour"):
        SceneObject("circle", "pink", "small", "left")
    with pytest.raises(ValueError, match="distinct shapes"):
        Scene((SceneObject("circle", "red", "small", "left"), SceneObject("circle", "blue", "small", "top")))
    with pytest.raises(ValueError, match="not a scene"):
        Scene.from_json({"things": []})


def test_facts_list_four_per_object():
    scene = Scene((SceneObject("circle", "red", "large", "left"),))
    assert scenes.facts(scene) == {("shape", "circle"), ("colour", "circle", "red"),
                                   ("size", "circle", "large"), ("position", "circle", "left")}


def test_write_scenes_is_an_imagefolder_with_a_row_per_caption(tmp_path):
    out = scenes.write_scenes(tmp_path / "scenes", n=4, seed=2)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 5
    assert Counter(r["file_name"] for r in rows) == {f"0000{i}.png": 5 for i in range(4)}
    examples = scenes.generate(4, seed=2)
    for ex in examples:
        assert (out / ex.file_name).read_bytes() == _png(ex.image)
        assert [r["text"] for r in rows if r["file_name"] == ex.file_name] == ex.captions
        assert all(Scene.from_json(r["scene"]) == ex.scene for r in rows if r["file_name"] == ex.file_name)

    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert loaded.num_rows == 20  # duplicated file_name rows stay one example per caption
    assert sorted(loaded["text"]) == sorted(r["text"] for r in rows)
    assert loaded[0]["image"].size == (scenes.IMAGE_SIZE,) * 2 == (72, 72)
