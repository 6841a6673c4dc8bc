"""Reports of a comparison: report.json, report.md and PNG plots a person would rather look at."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .evaluate import captions_by_image
from .html_report import write_html
from .metrics import caption_lengths

COLUMNS = ("avg_length", "distinct_words", "distinct_captions", "attribute_recall", "hallucination_rate",
           "position_accuracy", "bleu4", "cider")
SAMPLES = 8


def table(metrics: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per objective, the columns of ``COLUMNS`` that are present."""
    columns = [c for c in COLUMNS if any(c in m for m in metrics.values())]
    lines = ["| objective | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _plots(out_dir: Path, results: dict[str, dict[str, Any]], evaluation: Any) -> list[str]:
    names = list(results)
    written = []
    fig = Figure(figsize=(6, 3.5))  # matplotlib's object interface: no pyplot state, no backend to choose
    ax = fig.subplots()
    lengths = [caption_lengths(results[n]["captions"]) for n in names]
    top = max([max(x) for x in lengths if x] + [1])
    ax.hist(lengths, bins=range(0, top + 2), label=names, align="left")
    ax.set(xlabel="caption length (words)", ylabel="captions", title="Caption length per objective")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lengths.png", dpi=120)
    written.append("lengths.png")

    if all("attribute_recall" in results[n]["metrics"] for n in names):
        fig = Figure(figsize=(4.5, 4))
        ax = fig.subplots()
        for n in names:
            m = results[n]["metrics"]
            ax.scatter(m["hallucination_rate"], m["attribute_recall"], s=60)
            ax.annotate(n, (m["hallucination_rate"], m["attribute_recall"]), textcoords="offset points", xytext=(5, 5))
        ax.set(xlabel="hallucination rate (lower is better)", ylabel="attribute recall (higher is better)",
               title="Descriptiveness against hallucination")
        ax.margins(0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "recall_vs_hallucination.png", dpi=120)
        written.append("recall_vs_hallucination.png")

    shown = min(SAMPLES, len(evaluation.images))
    fig = Figure(figsize=(2.6 * shown, 2.6 + 0.45 * len(names)))
    axes = fig.subplots(1, shown, squeeze=False)
    for i, ax in enumerate(axes[0]):
        ax.imshow(evaluation.images[i])
        ax.set_xticks([])
        ax.set_yticks([])
        text = "\n".join(f"{n}: {_wrap(results[n]['captions'][i])}" for n in names)
        ax.set_xlabel(text, fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(out_dir / "examples.png", dpi=120)
    written.append("examples.png")
    return written


def _wrap(caption: str, width: int = 34) -> str:
    words, lines, line = caption.split(), [], ""
    for w in words:
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n   ".join(lines + [line])


def kinds_table(by_kind: dict[str, dict[str, dict[str, int]]]) -> str:
    """A markdown table: one row per objective, ``false/stated`` per kind of fact."""
    kinds = list(next(iter(by_kind.values())))
    lines = ["| objective | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, counts in by_kind.items():
        lines.append(f"| {name} | " + " | ".join(f"{counts[k]['false']}/{counts[k]['stated']}" for k in kinds) + " |")
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict[str, dict[str, Any]], evaluation: Any,
                 settings: dict[str, Any], token_views: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Write report.json, report.md, the plots and report.html; print and return the report.

    ``results`` maps an objective's name to its ``.evaluate.evaluate`` result. report.json holds
    the metrics per objective (``distinct_captions`` among them), the settings, a few samples, the
    plots and every caption with its image's file name: ``captions[objective] = [{"image", "caption"}]``.
    report.html (``html_report``) shows every held-out image with each objective's caption, and
    ``token_views`` (the per-token losses of the sample images' captions, ``html_report.write_html``).
    """
    out_dir = Path(out_dir)
    metrics = {name: r["metrics"] for name, r in results.items()}
    names = evaluation.names or [str(i) for i in range(len(evaluation.images))]
    samples = [{"image": names[i], "references": evaluation.references[i],
                "captions": {n: results[n]["captions"][i] for n in results}}
               for i in range(min(SAMPLES, len(names)))]
    plots = _plots(out_dir, results, evaluation)
    by_kind = {n: r["false_facts_by_kind"] for n, r in results.items() if "false_facts_by_kind" in r}
    report = {"objectives": metrics, "settings": settings, "samples": samples, "plots": plots,
              "captions": {n: captions_by_image(r) for n, r in results.items()}}
    if by_kind:
        report["false_facts_by_kind"] = by_kind
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    md = ["# seqloss compare", "", table(metrics), ""]
    if by_kind:
        md += ["False facts / stated facts, by kind:", "", kinds_table(by_kind), ""]
    md += [f"![{p}]({p})" for p in plots] + ["", "## Sample captions", ""]
    for s in samples:
        md.append(f"**{s['image']}** — references: " + " / ".join(f"*{r}*" for r in s["references"]))
        md += [f"- {n}: {c}" for n, c in s["captions"].items()] + [""]
    (out_dir / "report.md").write_text("\n".join(md))
    page = write_html(out_dir / "report.html", results, evaluation, title="seqloss compare", columns=COLUMNS,
                      plots=[out_dir / p for p in plots if p != "examples.png"], token_views=token_views)
    print(table(metrics))
    if by_kind:
        print("false facts / stated facts, by kind:\n" + kinds_table(by_kind))
    print(f"report: {out_dir / 'report.md'}")
    print(f"open in a browser: {page}")
    return report
