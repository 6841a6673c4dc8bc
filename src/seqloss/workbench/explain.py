"""``seqloss explain``: the per-token loss of one caption under MLE and SMILE (the paper's Figure 1 view).

Under MLE every token's softmax runs over the whole vocabulary; under SMILE only over the words of
the caption itself, so tokens the model would rather replace by an *unmentioned* detail are not
penalised for it. The bar chart shows where the two disagree.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from matplotlib.figure import Figure

from .. import functional
from .model import Captioner
from .objectives import objective_name, row_candidates

EXPLAINED = ("mle", "smile")  # the objectives the view compares by default


@torch.no_grad()
def token_losses(captioner: Captioner, image: Any, caption: str, objectives: Sequence[Any] = EXPLAINED,
                 options: Optional[Mapping[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """{"tokens": [...], name: [loss per token]} for the caption's supervised tokens, one entry per
    objective (a name or a mixture, named as ``objective_name`` writes it); ``options`` maps such a
    name to that objective's keyword options (subset's id lists as one list for the caption)."""
    captioner.model.eval()
    batch = captioner.encode([caption])
    logits = captioner.model(pixel_values=captioner.pixels([image]), input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    out: dict[str, Any] = {}
    # With shift=True the loss at position n scores the token at n + 1.
    targets = labels[0, 1:]
    keep = targets != -100
    out["tokens"] = captioner.tokenizer.convert_ids_to_tokens(targets[keep].tolist())
    for objective in objectives:
        name = objective_name(objective)
        keywords, _ = row_candidates((options or {}).get(name, {}), rows=1)
        per_position = functional.objective_loss(logits, labels, objective, shift=True, reduction="none",
                                                 **keywords)[0, :-1]
        out[name] = per_position[keep].tolist()
    return out


def plot(losses: dict[str, Any], path: Path, title: str = "") -> Path:
    tokens = losses["tokens"]
    names = [k for k in losses if k != "tokens"]
    width = 0.8 / len(names)
    fig = Figure(figsize=(max(5, 0.7 * len(tokens) + 1), 3.2))
    ax = fig.subplots()
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(tokens))], losses[name], width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(tokens))], tokens, rotation=30)
    ax.set(ylabel="loss (nats)", title=title or "Per-token loss of the caption")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def table(losses: dict[str, Any]) -> list[str]:
    names = [k for k in losses if k != "tokens"]
    lines = ["token".ljust(12) + "".join(n.rjust(10) for n in names)]
    for i, token in enumerate(losses["tokens"]):
        lines.append(token.ljust(12) + "".join(f"{losses[n][i]:10.3f}" for n in names))
    lines.append("total".ljust(12) + "".join(f"{sum(losses[n]):10.3f}" for n in names))
    return lines
