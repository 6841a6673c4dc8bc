"""report.html: self-contained, every held-out image with each objective's caption and its false
facts marked by kind, filterable and sortable — checked as text, then in a real headless browser
(Chromium from the system's packages, driven by Playwright): it loads with no console error, every
image renders, and the filters do what they say."""
from __future__ import annotations

import re
import shutil

import pytest

pytest.importorskip("matplotlib")
from seqloss.workbench import scenes  # noqa: E402
from seqloss.workbench.evaluate import EvalSet  # noqa: E402
from seqloss.workbench.html_report import marked_caption  # noqa: E402
from seqloss.workbench.metrics import false_facts_by_kind, scene_scores  # noqa: E402
from seqloss.workbench.report import write_report  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _wrong_colour(scene) -> str:
    """A caption stating one object with a colour it does not have."""
    obj = scene.objects[0]
    other = next(c for c in scenes.COLOURS if c != obj.colour)
    return f"a {other} {obj.shape} {scenes.POSITION_PHRASES[obj.position][0]}"


@pytest.fixture
def report(tmp_path):
    examples = scenes.generate(6, seed=3)
    evaluation = EvalSet.from_examples(examples)
    captions = {"mle": [e.captions[0] for e in examples], "smile": [_wrong_colour(e.scene) for e in examples]}
    results = {}
    for name, caps in captions.items():
        metrics = dict(avg_length=4.0, distinct_words=5, distinct_captions=6, bleu4=0.1, cider=0.2,
                       **scene_scores(caps, evaluation.scenes))
        results[name] = {"metrics": metrics, "captions": caps, "images": evaluation.names,
                         "false_facts_by_kind": false_facts_by_kind(caps, evaluation.scenes)}
    view = {"name": evaluation.names[0], "image": evaluation.images[0],
            "captions": [("reference", {"tokens": ["a", "red"], "mle": [1.0, 2.0], "smile": [0.5, 0.1]}),
                         ("smile's caption", {"tokens": ["a"], "mle": [0.3], "smile": [0.2]})]}
    write_report(tmp_path, results, evaluation, settings={}, token_views=[view])
    return tmp_path / "report.html", evaluation, captions


def test_a_false_fact_is_marked_by_its_kind():
    scene = scenes.Scene((scenes.SceneObject("circle", "red", "large", "left"),))
    text, errors = marked_caption("a blue circle on the right", scene)
    assert errors == {"shape": 0, "colour": 1, "size": 0, "position": 1}
    assert 'title="false colour">blue</span>' in text and text.count('title="false position"') == 3
    assert marked_caption("a red circle on the left", scene)[1] == {k: 0 for k in errors}


def test_the_page_is_self_contained_and_shows_every_image_with_every_caption(report):
    page, evaluation, captions = report
    text = page.read_text()
    assert not re.search(r'(src|href)="(https?:|//)', text), "nothing is fetched from elsewhere"
    assert text.count('<img src="data:image/png;base64,') >= len(evaluation.images) + 1  # images, plots, token view
    for name in evaluation.names:
        assert name in text
    assert text.count('data-objective="smile"') == len(evaluation.images)
    assert text.count('title="false colour"') == len(evaluation.images)  # one false colour per smile caption


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium; .ci/run installs it)")
def test_the_page_in_a_headless_browser(report, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    page_path, evaluation, _ = report
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            assert problems == []
            sizes = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
            assert sizes and all(done and width > 0 for done, width in sizes), sizes
            visible = "[...document.querySelectorAll('#images .card')].filter(c => c.offsetParent).length"
            assert page.evaluate(visible) == len(evaluation.images)
            page.select_option("#error", "position")  # no caption here states a false position
            assert page.evaluate(visible) == 0
            page.select_option("#error", "colour")    # every smile caption states a false colour
            assert page.evaluate(visible) == len(evaluation.images)
            page.uncheck("input.objective[value=smile]")
            assert page.evaluate(visible) == 0        # mle's captions are references: nothing false
            shown = "[...document.querySelectorAll('.caption')].filter(c => c.offsetParent).length"
            page.select_option("#error", "all")
            assert page.evaluate(shown) == len(evaluation.images)
            page.select_option("select.tokens", "1")
            assert page.evaluate("document.querySelector('.bars[data-caption=\"1\"]').offsetParent !== null")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            assert problems == []
        finally:
            browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
