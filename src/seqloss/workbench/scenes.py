"""The built-in **scenes** data set: Pillow-drawn images whose content is known exactly (DESIGN §5).

A generated scene holds 1-3 objects (a Scene may hold up to 4, one per shape), each with a shape, a colour, a size and a position. Every image comes with
``k`` reference captions that, like COCO annotators, each mention a random *part* of the scene, and
with the scene truth as facts, so a generated caption's attribute recall and hallucination rate can be
measured exactly (``seqloss.workbench.metrics``).

Layout rule: the image is a 3x3 grid and objects sit only in the five cells of the central cross; the
position word *is* that cell: ``left``/``right`` = middle row, outer column; ``top``/``bottom`` = middle
column, outer row; ``center`` = the middle cell. Corner cells are never used, so no object is ever
ambiguously "top left", and an object stays inside its cell (no overlaps). Shapes are unique within a
scene, so a fact keyed by the shape word (``("colour", "circle", "red")``) names exactly one object.
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from .settings import IMAGE_SIZE

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Phrases that follow the shape word in captions; the parser in metrics.py inverts this table.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left",), "right": ("on the right",), "top": ("at the top",),
    "bottom": ("at the bottom",), "center": ("in the center", "in the middle"),
}
PREFIXES: tuple[str, ...] = ("there is", "a picture of", "an image of", "a drawing of")
SUFFIX = "on a white background"
CONNECTORS: tuple[str, ...] = ("and", "with")  # between two objects; lists of 3+ end with "and"

VOCABULARY: tuple[str, ...] = tuple(sorted(
    set(SHAPES) | set(COLOURS) | set(SIZES) | {"a", "an"} | set(CONNECTORS) | set(SUFFIX.split())
    | {w for phrase in PREFIXES for w in phrase.split()}
    | {w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()}))

Fact = tuple[str, ...]

# The share of stated positions that open their noun phrase ("at the top a red circle") instead of
# closing it ("a red circle at the top"). Tried at 1.0 (and 0.5): it changed which initialisations
# learn to bind an object to its cell (seeds 1 and 3 did, 0 and 2 no longer did), not how many.
POSITION_FIRST = 0.0

# Objects per generated scene. References mention a random part of a scene, so the more objects, the
# smaller the part any one caption can cover: at up to 4, even a true reference recalled ~0.3 of a
# scene's facts and MLE's likeliest caption 0.24; at up to 3 MLE recalls about a third of them.
MAX_OBJECTS = 3

_RGB = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
        "yellow": (225, 195, 0), "purple": (140, 40, 180), "orange": (245, 125, 0)}
# The grid cell (col, row) that each position word names (also where grounding.py looks in the image).
CELLS = {"left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2), "center": (1, 1)}
_RADIUS = {"small": 0.2, "large": 0.4}  # half-extent as a fraction of a cell: large = 2x small
_BACKGROUND = 245  # near-white, so "on a white background" is true
_SUPERSAMPLE = 4   # draw 4x larger and downsample: anti-aliased edges keep small shapes legible

# Images are drawn at the size the default captioner reads (IMAGE_SIZE, model.py): 72 px, three 24-px
# cells a side, one vision patch per cell, so training, ``seqloss scenes`` and evaluation all see the same pixels.


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; every field is a word of the matching vocabulary tuple."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                               ("position", POSITIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"SceneObject.{field}={getattr(self, field)!r}: expected one of {allowed}")


@dataclass(frozen=True)
class Scene:
    """The structured truth of one image: its objects, each with a distinct shape and position."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= len(SHAPES):
            raise ValueError(f"a scene holds 1-{len(SHAPES)} objects, got {len(self.objects)}")
        for field in ("shape", "position"):
            values = [getattr(o, field) for o in self.objects]
            if len(set(values)) != len(values):
                raise ValueError(f"objects of a scene must have distinct {field}s, got {values}")

    def to_json(self) -> dict[str, list[dict[str, str]]]:
        """``{"objects": [{"shape", "colour", "size", "position"}, ...]}`` (JSON-ready dicts)."""
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict) -> Scene:
        """Inverse of ``to_json``; raises ValueError on anything else."""
        try:
            return cls(tuple(SceneObject(**o) for o in data["objects"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a scene: {data!r} ({err})") from None


@dataclass
class Example:
    """One generated image with its reference captions and truth."""

    image: Image.Image
    captions: list[str]
    scene: Scene
    file_name: str


def make_scene(rng: random.Random) -> Scene:
    """A random scene: 1-``MAX_OBJECTS`` objects, distinct shapes in distinct cells, colours and sizes free."""
    n = rng.randint(1, MAX_OBJECTS)
    shapes, positions = rng.sample(SHAPES, n), rng.sample(POSITIONS, n)
    return Scene(tuple(SceneObject(s, rng.choice(COLOURS), rng.choice(SIZES), p)
                       for s, p in zip(shapes, positions)))


def facts(scene: Scene) -> frozenset[Fact]:
    """The true facts: per object ("shape", s), ("colour", s, c), ("size", s, z), ("position", s, p)."""
    return frozenset(f for o in scene.objects for f in (
        ("shape", o.shape), ("colour", o.shape, o.colour), ("size", o.shape, o.size),
        ("position", o.shape, o.position)))


def draw(scene: Scene, image_size: int = IMAGE_SIZE, rng: Optional[random.Random] = None) -> Image.Image:
    """Render ``scene`` as an RGB ``image_size`` square on a near-white background.

    With ``rng`` each object is jittered inside its cell and light pixel noise is added; without it the
    objects are centred and the background is plain. Deterministic given the rng state.
    """
    big = image_size * _SUPERSAMPLE
    cell = big / 3
    canvas = Image.new("RGB", (big, big), (_BACKGROUND,) * 3)
    pen = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        r = _RADIUS[obj.size] * cell
        slack = max(0.0, cell / 2 - r - 0.05 * cell)  # keep a margin to the cell border
        col, row = CELLS[obj.position]
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        if rng is not None:
            cx, cy = cx + rng.uniform(-slack, slack), cy + rng.uniform(-slack, slack)
        _draw_shape(pen, obj.shape, cx, cy, r, _RGB[obj.colour])
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    if rng is None:
        return image
    noise = np.random.default_rng(rng.getrandbits(64)).integers(-6, 7, (image_size, image_size, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def _draw_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r  # a square of the circle's width looks bigger; equalise the visual mass
        pen.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    else:  # diamond: narrower than tall, so it never reads as a rotated square
        pen.polygon([(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)], fill=fill)


# --- captions --------------------------------------------------------------------------------------

# How many objects a caption mentions (1, 2, "3+") and how many attributes each gets: mostly short and
# partial like COCO references, with a tail of long, detailed ones for a descriptive objective to learn.
_OBJECTS_MENTIONED = ((1, 0.6), (2, 0.3), (3, 0.1))
_ATTRIBUTE_COUNTS = {1: ((0, 0.1), (1, 0.45), (2, 0.45)), 2: ((0, 0.3), (1, 0.5), (2, 0.2)),
                     3: ((1, 0.3), (2, 0.4), (3, 0.3))}
_ATTRIBUTES = ("size", "colour", "position")


def _weighted(rng: random.Random, table: Sequence[tuple[int, float]]) -> int:
    return rng.choices([v for v, _ in table], weights=[w for _, w in table])[0]


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(obj: SceneObject, attributes: Sequence[str], rng: random.Random) -> tuple[str, list[Fact]]:
    """``"a large red circle on the left"``: size and colour before the shape, position after it —
    or, with probability ``POSITION_FIRST``, before the whole phrase: ``"on the left a large red circle"``."""
    words = [w for attr, w in (("size", obj.size), ("colour", obj.colour)) if attr in attributes]
    words.append(obj.shape)
    said: list[Fact] = [("shape", obj.shape)] + [(a, obj.shape, getattr(obj, a)) for a in attributes]
    phrase = " ".join([_article(words[0])] + words)
    if "position" in attributes:
        where = rng.choice(POSITION_PHRASES[obj.position])
        first = POSITION_FIRST > 0 and rng.random() < POSITION_FIRST
        phrase = f"{where} {phrase}" if first else f"{phrase} {where}"
    return phrase, said


def caption_with_facts(scene: Scene, rng: random.Random) -> tuple[str, frozenset[Fact]]:
    """One reference caption and exactly the facts it states (what the parser must recover)."""
    n = min(_weighted(rng, _OBJECTS_MENTIONED), len(scene.objects))
    if n >= 3:
        n = rng.randint(3, len(scene.objects))
    phrases, said = [], []
    for obj in rng.sample(scene.objects, n):
        count = _weighted(rng, _ATTRIBUTE_COUNTS[min(n, 3)])
        phrase, obj_facts = _noun_phrase(obj, rng.sample(_ATTRIBUTES, count), rng)
        phrases.append(phrase)
        said += obj_facts
    if len(phrases) == 2:
        text = f" {rng.choice(CONNECTORS)} ".join(phrases)
    else:
        # "a red circle a blue square and a triangle"; with positions first, "and" between each, as a
        # position phrase between two noun phrases would be either's
        head = " and ".join(phrases[:-1]) if POSITION_FIRST else " ".join(phrases[:-1])
        text = " and ".join(filter(None, (head, phrases[-1])))
    if rng.random() < 0.3:
        text = f"{rng.choice(PREFIXES)} {text}"
    if rng.random() < 0.1:
        text = f"{text} {SUFFIX}"
    return text, frozenset(said)


def captions_with_facts(scene: Scene, rng: random.Random, k: int = 5) -> list[tuple[str, frozenset[Fact]]]:
    """``k`` captions with their stated facts, distinct where the scene allows (bounded retries)."""
    out: list[tuple[str, frozenset[Fact]]] = []
    for _ in range(20 * k):
        if len(out) == k:
            break
        text, said = caption_with_facts(scene, rng)
        if text not in (t for t, _ in out):
            out.append((text, said))
    while len(out) < k:  # a tiny scene ran out of distinct phrasings: repeats beat too few references
        out.append(caption_with_facts(scene, rng))
    return out


def captions(scene: Scene, rng: random.Random, k: int = 5) -> list[str]:
    """``k`` reference captions, each mentioning a random part of ``scene``; words from VOCABULARY.

    About 60% mention one object, 30% two, 10% three or more (capped by the scene), with 0-3 of
    size/colour/position each; some start with "there is"/"a picture of"..., a few end with "on a
    white background". Lowercase, single spaces, no punctuation.
    """
    return [text for text, _ in captions_with_facts(scene, rng, k)]


# --- the data set ----------------------------------------------------------------------------------

def generate(n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> list[Example]:
    """``n`` examples, deterministic from ``seed``: same seed, byte-identical images and captions.

    Example ``i`` depends only on ``(seed, i)``, so ``generate(m, seed)`` is a prefix of
    ``generate(n, seed)`` for ``m <= n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    width = max(5, len(str(n - 1)))
    examples = []
    for i in range(n):
        rng = random.Random(f"seqloss-scenes:{seed}:{i}")  # str seeds hash the same in every process
        scene = make_scene(rng)
        image = draw(scene, image_size, rng)
        examples.append(Example(image, captions(scene, rng), scene, f"{i:0{width}d}.png"))
    return examples


def write_scenes(out_dir: Union[str, Path], n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """Write ``generate(n, seed, image_size)`` as a ``datasets`` image folder and return ``out_dir``.

    Layout: ``out_dir/<file_name>.png``; ``out_dir/metadata.jsonl`` with one row per caption,
    ``{"file_name", "text", "scene"}`` (an image's rows share its file_name; "scene" is the truth as
    ``Scene.to_json``). (``seqloss scenes`` also saves the scenes tokenizer in ``out_dir/tokenizer/``:
    the tokenizer module imports this one, never the other way round.)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for ex in generate(n, seed, image_size):
            ex.image.save(out / ex.file_name)
            for text in ex.captions:
                row = {"file_name": ex.file_name, "text": text, "scene": ex.scene.to_json()}
                meta.write(json.dumps(row) + "\n")
    return out
