"""User data: an image folder with ``metadata.jsonl``, the ``datasets`` imagefolder convention.

Each line is a JSON object with ``file_name`` (relative to the folder) and ``text`` (one caption, or
a list of captions); several rows with the same ``file_name`` are that image's several captions. An
optional ``scene`` (``Scene.to_json``) carries the truth, as ``seqloss scenes`` writes it. A bad row is
an error naming the file and line, or, with ``skip_bad=True``, skipped and counted aloud: never a
silent drop.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from PIL import Image

from .scenes import Scene

METADATA = "metadata.jsonl"


@dataclass
class CaptionRecord:
    """One image of a folder: its captions (in file order) and, for scenes, its truth."""

    file_name: str
    path: Path
    captions: List[str]
    scene: Optional[Scene]


class _BadRow(ValueError):
    """A row that cannot be used; the message says why (the caller adds file and line)."""


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


def _parse_row(line: str, folder: Path, image_checks: Dict[Path, Optional[str]]
               ) -> Tuple[str, Path, List[str], Optional[Scene]]:
    """Validate one metadata line; raises _BadRow with the reason."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRow(f"malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    for key in ("file_name", "text"):
        if key not in row:
            raise _BadRow(f"missing key {key!r}")
    file_name, text = row["file_name"], row["text"]
    if not isinstance(file_name, str) or not file_name.strip():
        raise _BadRow(f"file_name must be a non-empty string, got {file_name!r}")
    texts = text if isinstance(text, list) else [text]
    if not texts:
        raise _BadRow("text is an empty list")
    for caption in texts:
        if not isinstance(caption, str):
            raise _BadRow(f"caption must be a string, got {caption!r}")
        if not caption.strip():
            raise _BadRow("empty caption")
    scene = Scene.from_json(row["scene"]) if row.get("scene") is not None else None  # ValueError
    path = folder / file_name
    if path not in image_checks:  # an image shared by several rows is opened once
        image_checks[path] = _image_problem(path)
    if image_checks[path] is not None:
        raise _BadRow(image_checks[path])
    return file_name, path, [c.strip() for c in texts], scene


def load_imagefolder(folder: Union[str, Path], skip_bad: bool = False) -> List[CaptionRecord]:
    """The records of ``folder/metadata.jsonl``, one per distinct ``file_name`` in first-seen order.

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
    records: Dict[str, CaptionRecord] = {}
    image_checks: Dict[Path, Optional[str]] = {}
    skipped: List[str] = []
    rows = 0
    with open(meta, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                file_name, path, texts, scene = _parse_row(line, folder, image_checks)
            except ValueError as err:
                where = f"{meta}, line {number}: {err}"
                if not skip_bad:
                    raise ValueError(where) from None
                skipped.append(where)
                continue
            record = records.setdefault(file_name, CaptionRecord(file_name, path, [], scene))
            record.captions.extend(texts)
            if record.scene is None:
                record.scene = scene
    if skipped:
        shown = "\n  ".join(skipped[:3]) + ("\n  ..." if len(skipped) > 3 else "")
        print(f"load_imagefolder: skipped {len(skipped)} of {rows} rows of {meta}:\n  {shown}",
              file=sys.stderr)
    if not records:
        raise ValueError(f"{meta}: no usable rows ({rows} rows, {len(skipped)} skipped)")
    return list(records.values())
