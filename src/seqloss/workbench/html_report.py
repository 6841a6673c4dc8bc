"""``report.html``: one self-contained page to look at a comparison in any browser.

Everything is inline (images and plots as data URLs, styles, a few lines of script): the metrics
table, the false facts by kind, the plots, every held-out image with each objective's caption side
by side — each false fact marked by its kind (shape, colour, size, position) where the scene truth
is known — filterable by objective and by kind of error and sortable by how many false facts an
objective's caption states, and, for the sample images, the per-token loss of a chosen caption under
each objective (``seqloss explain``'s view).
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .metrics import FACT_KINDS, fact_spans
from .scenes import Scene, facts

KIND_COLOURS = {"shape": "#d62728", "colour": "#9467bd", "size": "#ff7f0e", "position": "#1f77b4"}

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 16px; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots img { max-height: 300px; margin-right: 12px; }
.controls { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid #ddd; z-index: 1; }
.controls label { margin-right: 12px; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 12px; }
.card { width: 300px; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
.card img { width: 144px; height: 144px; image-rendering: pixelated; display: block; margin-bottom: 6px; }
.card .name { color: #777; font-size: 12px; }
.caption { margin: 4px 0; } .caption b { font-weight: 600; }
.false { color: #fff; border-radius: 3px; padding: 0 3px; }
.hidden { display: none !important; }
.legend span { margin-right: 10px; }
.bars td.bar div { height: 10px; background: #4c78a8; }
"""

SCRIPT = """
const cards = [...document.querySelectorAll('#images .card')];
const gallery = document.getElementById('images');
function shownObjectives() {
  return [...document.querySelectorAll('input.objective')].filter(i => i.checked).map(i => i.value);
}
function update() {
  const shown = shownObjectives();
  document.querySelectorAll('.caption').forEach(p => p.classList.toggle('hidden', !shown.includes(p.dataset.objective)));
  const kind = document.getElementById('error').value;
  cards.forEach(card => {
    const errors = shown.map(o => JSON.parse(card.dataset.errors)[o] || {});
    const count = e => kind === 'any' ? Object.values(e).reduce((a, b) => a + b, 0) : (e[kind] || 0);
    card.classList.toggle('hidden', kind !== 'all' && !errors.some(e => count(e) > 0));
  });
  const by = document.getElementById('sort').value;
  const key = card => by === 'image' ? Number(card.dataset.index)
    : -Object.values(JSON.parse(card.dataset.errors)[by] || {}).reduce((a, b) => a + b, 0);
  [...cards].sort((a, b) => key(a) - key(b) || Number(a.dataset.index) - Number(b.dataset.index))
    .forEach(card => gallery.appendChild(card));
}
function showTokens(select) {
  select.parentElement.querySelectorAll('.bars').forEach(t => t.classList.toggle('hidden', t.dataset.caption !== select.value));
}
document.querySelectorAll('.controls input, .controls select').forEach(e => e.addEventListener('change', update));
document.querySelectorAll('select.tokens').forEach(s => s.addEventListener('change', () => showTokens(s)));
update();
"""


def data_url(image: Any) -> str:
    """A PIL image (or a PNG file's path) as a ``data:image/png;base64,...`` URL."""
    if isinstance(image, (str, Path)):
        raw = Path(image).read_bytes()
    else:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        raw = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def marked_caption(caption: str, scene: Optional[Scene]) -> tuple[str, dict[str, int]]:
    """The caption as HTML with each false fact's words marked by kind, and the false facts per kind."""
    words = caption.split()
    marks: dict[int, str] = {}
    errors = {kind: 0 for kind in FACT_KINDS}
    if scene is not None:
        truth = facts(scene)
        for fact, start, end in fact_spans(caption):
            if fact in truth:
                continue
            errors[fact[0]] += 1
            for i in range(start, end):
                marks.setdefault(i, fact[0])
    out = []
    for i, word in enumerate(words):
        text = html.escape(word)
        kind = marks.get(i)
        out.append(text if kind is None else
                   f'<span class="false" style="background:{KIND_COLOURS[kind]}" title="false {kind}">{text}</span>')
    return " ".join(out), errors


def _metrics_table(metrics: dict[str, dict[str, Any]], columns: Sequence[str]) -> str:
    shown = [c for c in columns if any(c in m for m in metrics.values())]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    rows = []
    for name, m in metrics.items():
        cells = "".join(f'<td class="num">{_number(m.get(c))}</td>' for c in shown)
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f"<table><tr><th>objective</th>{head}</tr>{''.join(rows)}</table>"


def _number(value: Any) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _kinds_table(by_kind: dict[str, dict[str, dict[str, int]]]) -> str:
    kinds = list(next(iter(by_kind.values())))
    head = "".join(f'<th style="color:{KIND_COLOURS.get(k, "#222")}">{html.escape(k)}</th>' for k in kinds)
    rows = "".join(f"<tr><th>{html.escape(n)}</th>" + "".join(
        f'<td class="num">{c[k]["false"]}/{c[k]["stated"]}</td>' for k in kinds) + "</tr>"
        for n, c in by_kind.items())
    return f"<p>False facts / stated facts, by kind:</p><table><tr><th>objective</th>{head}</tr>{rows}</table>"


def _card(i: int, name: str, image: Any, references: Sequence[str], captions: dict[str, str],
          scene: Optional[Scene]) -> str:
    lines, errors = [], {}
    for objective, caption in captions.items():
        marked, errors[objective] = marked_caption(caption, scene)
        lines.append(f'<p class="caption" data-objective="{html.escape(objective)}"><b>{html.escape(objective)}</b>: '
                     f"{marked}</p>")
    title = html.escape(" / ".join(references))
    return (f"<div class=\"card\" data-index=\"{i}\" data-errors='{html.escape(json.dumps(errors))}'>"
            f'<img src="{data_url(image)}" alt="{html.escape(name)}" title="references: {title}">'
            f'<div class="name">{html.escape(name)}</div>{"".join(lines)}</div>')


def _token_view(view: dict[str, Any]) -> str:
    """One sample image: a select of captions and, per caption, each token's loss under each objective."""
    options = "".join(f'<option value="{k}">{html.escape(label)}</option>'
                      for k, (label, _) in enumerate(view["captions"]))
    tables = []
    for k, (_, losses) in enumerate(view["captions"]):
        objectives = [o for o in losses if o != "tokens"]
        top = max([v for o in objectives for v in losses[o]] + [1e-9])
        head = "".join(f"<th>{html.escape(o)}</th>" for o in objectives)
        rows = "".join(
            f"<tr><td>{html.escape(token)}</td>" + "".join(
                f'<td class="bar"><div style="width:{80 * losses[o][t] / top:.0f}px" title="{losses[o][t]:.3f}"></div>'
                f"{losses[o][t]:.2f}</td>" for o in objectives) + "</tr>"
            for t, token in enumerate(losses["tokens"]))
        tables.append(f'<table class="bars{"" if k == 0 else " hidden"}" data-caption="{k}"><tr><th>token</th>{head}'
                      f"</tr>{rows}</table>")
    return (f'<div class="card"><img src="{data_url(view["image"])}" alt="{html.escape(view["name"])}">'
            f'<select class="tokens">{options}</select>{"".join(tables)}</div>')


def write_html(path: Path, results: dict[str, dict[str, Any]], evaluation: Any, *, title: str,
               columns: Sequence[str], plots: Sequence[Path] = (),
               token_views: Sequence[dict[str, Any]] = ()) -> Path:
    """Write the page. ``results`` maps a name (an objective, a model) to its ``evaluate`` result;
    ``evaluation`` is the held-out ``EvalSet``; ``token_views`` are ``{"name", "image", "captions":
    [(label, explain.token_losses result)]}`` for the sample images."""
    names = list(results)
    metrics = {n: r["metrics"] for n, r in results.items()}
    by_kind = {n: r["false_facts_by_kind"] for n, r in results.items() if "false_facts_by_kind" in r}
    image_names = evaluation.names or [str(i) for i in range(len(evaluation.images))]
    scenes = evaluation.scenes or [None] * len(evaluation.images)
    cards = [_card(i, image_names[i], evaluation.images[i], evaluation.references[i],
                   {n: results[n]["captions"][i] for n in names}, scenes[i]) for i in range(len(evaluation.images))]
    checks = "".join(f'<label><input type="checkbox" class="objective" value="{html.escape(n)}" checked> '
                     f"{html.escape(n)}</label>" for n in names)
    errors = "".join(f'<option value="{k}">with a false {k}</option>' for k in FACT_KINDS)
    sorts = "".join(f'<option value="{html.escape(n)}">most false facts: {html.escape(n)}</option>' for n in names)
    legend = "".join(f'<span class="false" style="background:{c}">{k}</span>' for k, c in KIND_COLOURS.items())
    parts = [f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             _metrics_table(metrics, columns), _kinds_table(by_kind) if by_kind else "",
             '<div class="plots">' + "".join(f'<img src="{data_url(p)}" alt="{html.escape(Path(p).name)}">'
                                             for p in plots) + "</div>"]
    if token_views:
        parts.append("<h2>Per-token loss of a caption under each objective</h2><p>The loss each objective gives "
                     "every word of the chosen caption, from the same starting captioner: under SMILE a word is "
                     "not pushed against words the caption does not use.</p><div class=\"gallery tokens-view\">"
                     + "".join(_token_view(v) for v in token_views) + "</div>")
    parts.append(f'<h2>Every held-out image</h2><div class="controls">{checks}'
                 f'<label>images <select id="error"><option value="all">all</option>'
                 f'<option value="any">with a false fact</option>{errors}</select></label>'
                 f'<label>sort <select id="sort"><option value="image">by image</option>{sorts}</select></label>'
                 + (f'<span class="legend">false facts: {legend}</span>' if by_kind else "") + "</div>"
                 f'<div class="gallery" id="images">{"".join(cards)}</div>')
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path
