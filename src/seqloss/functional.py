"""Every public function, with ``torch.nn.functional``-style signatures: the objectives on logits,
and ``linear_loss`` (the fused LM head). Each validates its call once (``_validate.check_call``) and
hands it to the one dispatch point (``dispatch.py``).

Common keywords of every function (DESIGN §2):

* ``shift=False`` — ``True`` scores ``logits[..., n, :]`` against ``labels[..., n + 1]`` (causal LMs,
  BLIP); labels always come in unshifted, as Hugging Face passes them.
* ``ignore_index=-100`` — positions with this label contribute nothing.
* ``label_smoothing=0.0`` — ε spread over each position's support.
* ``reduction="mean"`` — ``"mean"`` (÷ supervised tokens, or ÷ ``num_items_in_batch``), ``"sum"``,
  ``"none"`` (same shape as labels, aligned with the logits positions, 0 where there is no target),
  ``"sequence"`` (per-row sums, BLIP's ``reduction='none'``).
* ``num_items_in_batch=None`` — Hugging Face's gradient-accumulation denominator.
* ``impl="auto"`` — ``"reference"`` (dense spec), ``"torch"`` (efficient, any device), ``"triton"``
  (GPU kernels; CPU tensors only under ``TRITON_INTERPRET=1``), ``"auto"`` (``"torch"`` for now).

Losses are fp32 whatever the inputs' dtype, with fp32 math inside, also under ``torch.autocast``;
each gradient comes back in its input's dtype. Every function compiles with
``torch.compile(fullgraph=True)`` (traced, the engines are opaque custom ops; see
``seqloss.autograd``); under tracing, checks that read tensor values are skipped, and ``random_subset`` draws from the global
RNG (Dynamo cannot trace a ``torch.Generator``: pass ``generator=None``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import dispatch
from ._validate import check_call

Objective = Union[str, Mapping[str, float]]


def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = "mle", **options: Any) -> Tensor:
    """Any objective, or a weighted mixture such as ``{"mle": 0.01, "smile": 0.99}``.

    ``logits`` (..., N, V) and ``labels`` (..., N). Options of the mixture's members (``exclude_ids``,
    ``eos_token_id``, ...) go to the members that accept them; an option none accepts is a TypeError.
    """
    return dispatch.logits_loss(logits, check_call(objective, options, logits=logits, labels=labels))


def cross_entropy(logits: Tensor, labels: Tensor, **common: Any) -> Tensor:
    """Maximum likelihood: softmax over the whole vocabulary (``F.cross_entropy`` semantics)."""
    return objective_loss(logits, labels, "mle", **common)


def smile_loss(logits: Tensor, labels: Tensor, *, first_token_mle: bool = True, exclude_ids: Sequence[int] = (),
               **common: Any) -> Tensor:
    """SMILE, semipermeable MLE (Yue et al., NeurIPS 2023, arXiv 2306.13460).

    The softmax at each position of row b runs over the ids that occur as labels in row b (minus
    ``exclude_ids``), so the model is not pushed away from words it could add to a caption. With
    ``first_token_mle`` the first supervised position of each row uses the whole vocabulary.
    """
    return objective_loss(logits, labels, "smile", first_token_mle=first_token_mle, exclude_ids=exclude_ids,
                          **common)


def random_subset_loss(logits: Tensor, labels: Tensor, *, num_samples: int = 10,
                       generator: Optional[torch.Generator] = None, exclude_ids: Sequence[int] = (),
                       **common: Any) -> Tensor:
    """Random subsetting (SMILE paper, ablation): the label plus ``num_samples`` ids drawn uniformly
    from [0, V) with replacement at each position, minus ``exclude_ids``."""
    return objective_loss(logits, labels, "random_subset", num_samples=num_samples, generator=generator,
                          exclude_ids=exclude_ids, **common)


def reverse_subset_loss(logits: Tensor, labels: Tensor, *, exclude_ids: Sequence[int] = (), **common: Any) -> Tensor:
    """Reverse subsetting (SMILE paper, ablation): the label plus every id that does *not* occur as a
    label in its row, minus ``exclude_ids``."""
    return objective_loss(logits, labels, "reverse_subset", exclude_ids=exclude_ids, **common)


def selective_eos_loss(logits: Tensor, labels: Tensor, *, eos_token_id: int, **common: Any) -> Tensor:
    """Selective EOS ("Less is More", Yue et al., ACL 2024, arXiv 2402.14545): every id except EOS,
    unless the label is EOS — the model is never pushed to end early, only taught where to end."""
    return objective_loss(logits, labels, "selective_eos", eos_token_id=eos_token_id, **common)


def subset_cross_entropy(logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = None,
                         exclude: Optional[Tensor] = None, **common: Any) -> Tensor:
    """Cross-entropy over explicit candidates (sampled softmax); the label is always a candidate.

    ``include`` (..., K) per row or (..., N, K) per label position (same leading shape as the labels,
    shifted with them), or ``exclude`` (..., K) per row; negative entries are padding.
    """
    return objective_loss(logits, labels, "subset", include=include, exclude=exclude, **common)


def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                objective: Objective = "mle", **options: Any) -> Tensor:
    """Any objective on ``hidden @ weight.T + bias`` without materialising those logits (the fused LM head).

    ``hidden`` (..., N, H), ``weight`` (V, H) (``nn.Linear`` / ``lm_head.weight`` layout), ``bias``
    (V,) or None, ``labels`` (..., N) unshifted. Takes every option of :func:`objective_loss`;
    ``impl="reference"`` builds the logits and runs the dense spec. Dtypes may differ: under
    ``torch.autocast`` the head runs in autocast's dtype (as ``F.linear`` would), elsewhere in the
    widest of the three; the softmax math is fp32 and each gradient comes back in its input's dtype.
    """
    call = check_call(objective, options, hidden=hidden, weight=weight, bias=bias, labels=labels)
    return dispatch.linear_loss(hidden, weight, bias, call)
