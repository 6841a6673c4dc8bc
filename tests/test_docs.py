"""The documentation site (MkDocs + mkdocstrings, ``mkdocs.yml``) builds with warnings as errors —
a broken link, a missing page or a reference that no longer resolves fails here — and its API
reference has an entry for every public name of ``seqloss``, ``seqloss.hf`` and ``seqloss.masking``."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")

import seqloss  # noqa: E402
import seqloss.hf  # noqa: E402
import seqloss.masking  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _anchors(page: Path) -> set[str]:
    return set(re.findall(r'id="([^"]+)"', page.read_text()))


@pytest.mark.parametrize("module, page", [(seqloss, "seqloss"), (seqloss.hf, "hf"), (seqloss.masking, "masking")])
def test_every_public_name_has_a_reference_entry(site, module, page):
    anchors = _anchors(site / "reference" / page / "index.html")
    names = [n for n in module.__all__ if not (module is seqloss and n == "masking")]  # masking has its own page
    missing = [n for n in names if f"{module.__name__}.{n}" not in anchors]
    assert not missing, f"no reference entry for {missing}"


def test_every_page_of_the_nav_is_built_and_the_results_are_included(site):
    for page in ("getting-started", "workbench", "objectives", "library", "fused-head", "huggingface", "masking",
                 "benchmarks", "reference/keywords"):
        assert (site / page / "index.html").is_file(), page
    assert "Objectives on logits" in (site / "benchmarks" / "index.html").read_text()
