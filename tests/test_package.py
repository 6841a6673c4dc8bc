"""The package's public surface: the names of DESIGN §2, and one version source."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import seqloss

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_exists():
    for name in seqloss.__all__:
        assert hasattr(seqloss, name), name


def test_the_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    try:
        installed = importlib.metadata.version("seqloss")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("seqloss is not installed")
    assert installed == seqloss.__version__
