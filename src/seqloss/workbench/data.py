"""User data: captioned images in the three layouts captioning users keep them in, and a held-out split.

* an **image folder** with ``metadata.jsonl`` (the ``datasets`` imagefolder convention): one JSON object
  per line with ``file_name`` (relative to the folder) and ``text`` (a caption or a list of them); an
  optional ``scene`` (``Scene.to_json``) carries the truth, as ``seqloss scenes`` writes it;
* **BLIP caption JSON** (``coco_karpathy_train.json``, SMILE's files): a list of
  ``{"image": relative path, "caption": text or list of texts}``, images under an image root;
* **COCO captions JSON** (``captions_train2017.json``): ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``, images under an image root.

``load_captions`` picks the reader from the path: a folder, or a ``.json`` file whose top level is a
list (BLIP) or an object (COCO). Captions of one image (several rows or entries naming it) are
gathered into one record. A bad entry is a ValueError naming the file and the entry (line, index or
id), or, with ``skip_bad=True``, skipped and counted aloud on stderr: never a silent drop.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from PIL import Image
from tqdm.auto import tqdm

from .scenes import Scene

METADATA = "metadata.jsonl"
DEFAULT_EVAL_FRACTION = 0.1  # of the images of --data held out for evaluate and compare (COCO-like 90/10)


@dataclass
class CaptionRecord:
    """One image: its captions (in file order) and, for scenes, its truth."""

    file_name: str
    path: Path
    captions: list[str]
    scene: Optional[Scene]


class _BadEntry(ValueError):
    """An entry that cannot be used; the message says why (the reader adds file and entry)."""


def _image_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a readable image, or None when Pillow can open and verify it."""
    if not path.is_file():
        return f"image file {str(path)!r} does not exist"
    try:
        with Image.open(path) as image:
            image.verify()  # checks structure and checksums without decoding every pixel
    except Exception as err:  # Pillow raises many types for corrupt files; all mean "unreadable"
        return f"image file {str(path)!r} is not readable by Pillow ({type(err).__name__}: {err})"
    return None


def open_image(path: Union[str, Path]) -> Image.Image:
    """The RGB image at ``path``; ValueError naming the file when it is missing or not an image."""
    problem = _image_problem(Path(path))
    if problem is not None:
        raise ValueError(problem)
    with Image.open(path) as image:
        return image.convert("RGB")


def _texts(value: Any, key: str) -> list[str]:
    """A caption or a non-empty list of captions, each a non-blank string, stripped."""
    texts = value if isinstance(value, list) else [value]
    if not texts:
        raise _BadEntry(f"{key} is an empty list")
    for text in texts:
        if not isinstance(text, str):
            raise _BadEntry(f"caption must be a string, got {text!r}")
        if not text.strip():
            raise _BadEntry("empty caption")
    return [text.strip() for text in texts]


def _keys(entry: Any, *keys: str) -> list[Any]:
    if not isinstance(entry, dict):
        raise _BadEntry(f"expected a JSON object, got {type(entry).__name__}")
    for key in keys:
        if key not in entry:
            raise _BadEntry(f"missing key {key!r}")
    return [entry[key] for key in keys]


class _Collector:
    """Gathers the records of one annotation file; every entry goes through ``entry``."""

    def __init__(self, source: Path, image_root: Path, skip_bad: bool, unit: str, hint: str = "") -> None:
        self.source, self.image_root, self.skip_bad, self.unit, self.hint = source, image_root, skip_bad, unit, hint
        self.records: dict[str, CaptionRecord] = {}
        self.image_checks: dict[Path, Optional[str]] = {}
        self.skipped: list[str] = []
        self.entries = 0
        # Every image is opened and verified once: on a large data set that takes a while, so a bar
        # appears when it lasts more than two seconds.
        self.progress = tqdm(desc=f"checking the images of {source.name}", unit=" images", delay=2, file=sys.stderr)

    @contextlib.contextmanager
    def entry(self, where: str, new: bool = True) -> Iterator[None]:
        """Run one entry's parsing; a ValueError inside names ``where`` and fails or is counted.
        ``new=False``: a second look at an entry already counted (a COCO image, once its captions are known)."""
        self.entries += new
        try:
            yield
        except ValueError as err:
            message = f"{self.source}, {where}: {err}"
            if not self.skip_bad:
                raise ValueError(message) from None
            self.skipped.append(message)

    def add(self, file_name: Any, texts: list[str], scene: Optional[Scene] = None) -> None:
        """Add an image's captions; the image must exist and be readable (each file opened once)."""
        if not isinstance(file_name, str) or not file_name.strip():
            raise _BadEntry(f"image name must be a non-empty string, got {file_name!r}")
        path = Path(os.path.normpath(self.image_root / file_name))
        if path not in self.image_checks:
            self.image_checks[path] = _image_problem(path)
            self.progress.update()
        problem = self.image_checks[path]
        if problem is not None:
            raise _BadEntry(problem + self.hint)
        record = self.records.setdefault(str(path), CaptionRecord(file_name, path, [], scene))
        record.captions.extend(texts)
        if record.scene is None:
            record.scene = scene

    def finish(self) -> list[CaptionRecord]:
        self.progress.close()
        if self.skipped:
            shown = "\n  ".join(self.skipped[:3]) + ("\n  ..." if len(self.skipped) > 3 else "")
            print(f"skipped {len(self.skipped)} of {self.entries} {self.unit} of {self.source}:\n  {shown}",
                  file=sys.stderr)
        if not self.records:
            raise ValueError(f"{self.source}: no usable {self.unit} ({self.entries} {self.unit}, "
                             f"{len(self.skipped)} skipped)")
        return list(self.records.values())


def load_imagefolder(folder: Union[str, Path], skip_bad: bool = False) -> list[CaptionRecord]:
    """The records of ``folder/metadata.jsonl``, one per distinct image in first-seen order.

    Raises ValueError naming ``metadata.jsonl`` and the line number for: malformed JSON, a missing
    ``file_name``/``text``, an empty caption, an invalid ``scene``, or an image that is missing or
    unreadable by Pillow. With ``skip_bad=True`` such rows are skipped and their count (with the
    first reasons) is printed to stderr. Blank lines are ignored. FileNotFoundError when the folder
    has no ``metadata.jsonl``; ValueError when no usable row remains.
    """
    folder = Path(folder)
    meta = folder / METADATA
    if not meta.is_file():
        raise FileNotFoundError(f"no {METADATA} in {str(folder)!r}: expected {str(meta)!r} with one "
                                f'JSON object per line, e.g. {{"file_name": "0001.png", "text": "a caption"}}')
    collector = _Collector(meta, folder, skip_bad, "rows")
    with open(meta, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            with collector.entry(f"line {number}"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise _BadEntry(f"malformed JSON ({err.msg} at column {err.colno})") from None
                file_name, text = _keys(row, "file_name", "text")
                texts = _texts(text, "text")
                scene = Scene.from_json(row["scene"]) if row.get("scene") is not None else None  # ValueError
                collector.add(file_name, texts, scene)
    return collector.finish()


def _blip_records(entries: list[Any], collector: _Collector) -> list[CaptionRecord]:
    for index, entry in enumerate(entries):
        with collector.entry(f"entry {index}"):
            image, caption = _keys(entry, "image", "caption")
            collector.add(image, _texts(caption, "caption"))
    return collector.finish()


def _coco_records(data: dict[str, Any], collector: _Collector) -> list[CaptionRecord]:
    images: dict[Any, tuple[int, str]] = {}  # id -> (index in "images", file_name)
    for index, entry in enumerate(data["images"]):
        with collector.entry(f"images[{index}]"):
            image_id, file_name = _keys(entry, "id", "file_name")
            if image_id in images:
                raise _BadEntry(f"duplicate image id {image_id!r} (first at images[{images[image_id][0]}])")
            images[image_id] = (index, file_name)
    captions: dict[Any, list[str]] = {}
    for index, entry in enumerate(data["annotations"]):
        where = f"annotations[{index}]" + (f" (id {entry['id']})" if isinstance(entry, dict) and "id" in entry else "")
        with collector.entry(where):
            image_id, caption = _keys(entry, "image_id", "caption")
            if image_id not in images:
                raise _BadEntry(f"image_id {image_id!r} is not the id of a usable entry of 'images'")
            captions.setdefault(image_id, []).extend(_texts(caption, "caption"))
    for image_id, (index, file_name) in images.items():
        with collector.entry(f"images[{index}] (id {image_id})", new=False):
            if image_id not in captions:
                raise _BadEntry("no caption in 'annotations' names this image")
            collector.add(file_name, captions[image_id])
    return collector.finish()


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason})") from None


def load_captions(path: Union[str, Path], image_root: Optional[Union[str, Path]] = None,
                  skip_bad: bool = False) -> list[CaptionRecord]:
    """The records of an image folder, a BLIP caption JSON or a COCO captions JSON (see the module).

    ``image_root`` (JSON only; default: the JSON file's folder) is where the images' relative paths
    start. FileNotFoundError when ``path`` does not exist; ValueError for anything else that cannot
    be read, naming the file (and the entry, as ``load_imagefolder`` does).
    """
    path = Path(path)
    if path.is_dir():
        if image_root is not None:
            raise ValueError(f"image_root applies to JSON annotation files; {str(path)!r} is an image folder "
                             f"whose metadata.jsonl names images relative to the folder itself")
        return load_imagefolder(path, skip_bad)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist: expected an image folder with {METADATA}, "
                                f"a BLIP caption JSON or a COCO captions JSON file")
    if path.suffix.lower() != ".json":
        raise ValueError(f"{str(path)!r}: expected an image folder with {METADATA} or a .json annotation file "
                         f"(BLIP caption JSON or COCO captions JSON)")
    root = Path(image_root) if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root {str(root)!r} is not a folder")
    hint = f" (image paths are resolved against the image root {str(root)!r}; set it with --image-root)"
    data = _read_json(path)
    if isinstance(data, list):
        return _blip_records(data, _Collector(path, root, skip_bad, "entries", hint))
    if isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list):
        return _coco_records(data, _Collector(path, root, skip_bad, "entries", hint))
    found = type(data).__name__ if not isinstance(data, dict) else f"an object with keys {sorted(data)[:6]}"
    raise ValueError(f"{path}: expected BLIP caption JSON (a list of {{\"image\", \"caption\"}}) or COCO captions "
                     f"JSON (an object with lists \"images\" and \"annotations\"), got {found}")


def split_by_image(records: Sequence[CaptionRecord], eval_fraction: float, seed: int = 0
                   ) -> tuple[list[CaptionRecord], list[CaptionRecord]]:
    """(train, held_out): ``round(eval_fraction * images)`` images (at least one) held out, all of an
    image's captions on the same side. Which images depends only on ``seed`` and the file names (a
    hash ranks them), so train, evaluate and compare given the same data and seed agree, whatever
    the file order. Both parts keep the records' order. ``eval_fraction=0``: nothing held out.
    """
    if not isinstance(eval_fraction, (int, float)) or isinstance(eval_fraction, bool) or not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
    if eval_fraction == 0:
        return list(records), []
    held = max(1, round(eval_fraction * len(records)))
    if held >= len(records):
        raise ValueError(f"cannot hold out {eval_fraction:g} of {len(records)} images and train on the rest: "
                         f"give more images, a smaller eval fraction, or separate eval data")
    rank = sorted(range(len(records)),
                  key=lambda i: hashlib.sha256(f"{seed}:{records[i].file_name}".encode()).hexdigest())
    held_out = set(rank[:held])
    return ([r for i, r in enumerate(records) if i not in held_out],
            [r for i, r in enumerate(records) if i in held_out])


def load_split(data: Union[str, Path], *, eval_data: Optional[Union[str, Path]] = None,
               eval_fraction: Optional[float] = None, seed: int = 0,
               image_root: Optional[Union[str, Path]] = None, skip_bad: bool = False
               ) -> tuple[list[CaptionRecord], list[CaptionRecord]]:
    """(train, held_out) of user data: all of ``data`` and all of ``eval_data`` when it is given, else
    ``split_by_image`` of ``data`` with ``eval_fraction`` (default ``DEFAULT_EVAL_FRACTION``).

    ``image_root`` applies to whichever of the two is a JSON file. Images of ``eval_data`` that are
    also training images are counted aloud (scores on them are not held-out scores).
    """
    if eval_data is not None and eval_fraction is not None:
        raise ValueError("give either eval_fraction (hold out part of the data) or eval_data, not both")
    paths = [Path(data)] + ([Path(eval_data)] if eval_data is not None else [])
    if image_root is not None and not any(p.suffix.lower() == ".json" and not p.is_dir() for p in paths):
        raise ValueError("image_root applies to JSON annotation files; neither the data nor the eval data is one")

    def load(path: Path) -> list[CaptionRecord]:
        return load_captions(path, image_root if path.suffix.lower() == ".json" else None, skip_bad)

    records = load(paths[0])
    if eval_data is None:
        return split_by_image(records, DEFAULT_EVAL_FRACTION if eval_fraction is None else eval_fraction, seed)
    held_out = load(paths[1])
    shared = {r.path for r in records} & {r.path for r in held_out}
    if shared:
        print(f"warning: {len(shared)} of the {len(held_out)} images of {paths[1]} are also training images "
              f"of {paths[0]}", file=sys.stderr)
    return records, held_out
