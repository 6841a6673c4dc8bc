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
  ``"sequence"`` (per-row sums, BLIP's ``reduction='none'``; with ``position_ids``, a 1-D tensor
  of one sum per packed example, in row-major order — padding whose positions restart counts as
  examples of its own, each summing to 0 — not traceable by ``torch.compile``, its length being data).
* ``num_items_in_batch=None`` — Hugging Face's gradient-accumulation denominator.
* ``impl="auto"`` — ``"reference"`` (dense spec), ``"torch"`` (efficient, any device), ``"triton"``
  (GPU kernels; CPU tensors only under ``TRITON_INTERPRET=1``), ``"auto"`` (``"torch"`` for now).
* ``position_ids=None`` — (..., N), Hugging Face's padding-free convention (``DataCollatorWithFlattening``,
  TRL's ``packing``/``padding_free``): a packed example starts wherever the positions do not count
  on from the previous one (a restart at 0). Each example is its own sequence: its own SMILE and
  reverse-subset token set, its own first supervised position, and with ``shift=True`` its last
  position has no target (it never predicts the next example). A packed row's loss and gradients
  equal those of its examples as separate rows, for every objective.
* ``turns=False`` — ``True`` makes each maximal run of supervised labels its own sequence (its own
  token set and first-token MLE): multi-turn chats whose non-assistant tokens are ``ignore_index``,
  where each assistant answer is a target sequence of its own. Runs never cross packed examples.
* ``softcap=None`` — c: the logits become c·tanh(z / c) before the softmax (Gemma 2/3's
  ``final_logit_softcapping``), each logit capped as the engine reads or makes it (no copy).
* ``z_loss=0.0`` — ζ: each supervised position adds ζ·lse², lse over its support (PaLM's z-loss
  for MLE, 1e-4 there), weighted and reduced like the loss.
* ``weight=None`` (``class_weight=`` on ``linear_loss``, whose ``weight`` is the head) — (V,)
  class weights with ``F.cross_entropy(weight=...)``'s semantics: a position's loss times its
  label's weight, the mean divided by the sum of those weights (or by ``num_items_in_batch``);
  for subset objectives, likewise the weight of the label's class. Not with label smoothing.
* ``return_stats=False`` — ``True`` returns a :class:`LossStats`: the loss, its z-loss part, the
  token accuracy and the predicted ids (the argmax over the whole vocabulary at every position;
  on the fused head this costs one more pass of the head, without gradients). For eager calls.

Losses are fp32 whatever the inputs' dtype, with fp32 math inside, also under ``torch.autocast``;
each gradient comes back in its input's dtype. Every function compiles with
``torch.compile(fullgraph=True)`` (traced, the engines are opaque custom ops; see
``seqloss.autograd``); under tracing, checks that read tensor values are skipped, and ``random_subset`` draws from the global
RNG (Dynamo cannot trace a ``torch.Generator``: pass ``generator=None``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Optional, Union, overload

import torch
from torch import Tensor

from . import dispatch
from ._validate import check_call
from ._validate_sampled import check_sampled_call
from .dispatch import LossStats

# With return_stats=True a function returns a LossStats (the loss and its extras) instead of the loss.
Loss = Union[Tensor, LossStats]

Objective = Union[str, Mapping[str, float]]


@overload
def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = ..., *,
                   return_stats: Literal[False] = ..., **options: Any) -> Tensor: ...
@overload
def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = ..., *,
                   return_stats: Literal[True], **options: Any) -> LossStats: ...


def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = "mle", **options: Any) -> Loss:
    """Any objective, or a weighted mixture such as ``{"mle": 0.01, "smile": 0.99}``.

    ``logits`` (..., N, V) and ``labels`` (..., N). Options of the mixture's members (``exclude_ids``,
    ``eos_token_id``, ...) go to the members that accept them; an option none accepts is a TypeError.
    """
    return dispatch.logits_loss(logits, check_call(objective, options, logits=logits, labels=labels))


def cross_entropy(logits: Tensor, labels: Tensor, **common: Any) -> Loss:
    """Maximum likelihood: softmax over the whole vocabulary (``F.cross_entropy`` semantics)."""
    return objective_loss(logits, labels, "mle", **common)


def smile_loss(logits: Tensor, labels: Tensor, *, first_token_mle: bool = True, exclude_ids: Sequence[int] = (),
               **common: Any) -> Loss:
    """SMILE, semipermeable MLE (Yue et al., NeurIPS 2023, arXiv 2306.13460).

    The softmax at each position of row b runs over the ids that occur as labels in row b (minus
    ``exclude_ids``), so the model is not pushed away from words it could add to a caption. With
    ``first_token_mle`` the first supervised position of each row uses the whole vocabulary.
    """
    return objective_loss(logits, labels, "smile", first_token_mle=first_token_mle, exclude_ids=exclude_ids,
                          **common)


def random_subset_loss(logits: Tensor, labels: Tensor, *, num_samples: int = 10,
                       generator: Optional[torch.Generator] = None, exclude_ids: Sequence[int] = (),
                       **common: Any) -> Loss:
    """Random subsetting (SMILE paper, ablation): the label plus ``num_samples`` ids drawn uniformly
    from [0, V) with replacement at each position, minus ``exclude_ids``."""
    return objective_loss(logits, labels, "random_subset", num_samples=num_samples, generator=generator,
                          exclude_ids=exclude_ids, **common)


def reverse_subset_loss(logits: Tensor, labels: Tensor, *, exclude_ids: Sequence[int] = (), **common: Any) -> Loss:
    """Reverse subsetting (SMILE paper, ablation): the label plus every id that does *not* occur as a
    label in its row, minus ``exclude_ids``."""
    return objective_loss(logits, labels, "reverse_subset", exclude_ids=exclude_ids, **common)


def selective_eos_loss(logits: Tensor, labels: Tensor, *, eos_token_id: int, **common: Any) -> Loss:
    """Selective EOS ("Less is More", Yue et al., ACL 2024, arXiv 2402.14545): every id except EOS,
    unless the label is EOS — the model is never pushed to end early, only taught where to end."""
    return objective_loss(logits, labels, "selective_eos", eos_token_id=eos_token_id, **common)


def subset_cross_entropy(logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = None,
                         exclude: Optional[Tensor] = None, **common: Any) -> Loss:
    """Cross-entropy over explicit candidates (sampled softmax); the label is always a candidate.

    ``include`` (..., K) per row or (..., N, K) per label position (same leading shape as the labels,
    shifted with them), or ``exclude`` (..., K) per row; negative entries are padding.
    """
    return objective_loss(logits, labels, "subset", include=include, exclude=exclude, **common)


@overload
def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = ...,
                objective: Objective = ..., return_stats: Literal[False] = ..., **options: Any) -> Tensor: ...
@overload
def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = ...,
                objective: Objective = ..., return_stats: Literal[True], **options: Any) -> LossStats: ...


def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                objective: Objective = "mle", **options: Any) -> Loss:
    """Any objective on ``hidden @ weight.T + bias`` without materialising those logits (the fused LM head).

    ``hidden`` (..., N, H), ``weight`` (V, H) (``nn.Linear`` / ``lm_head.weight`` layout), ``bias``
    (V,) or None, ``labels`` (..., N) unshifted. Takes every option of :func:`objective_loss`;
    ``impl="reference"`` builds the logits and runs the dense spec. Dtypes may differ: under
    ``torch.autocast`` the head runs in autocast's dtype (as ``F.linear`` would), elsewhere in the
    widest of the three; the softmax math is fp32 and each gradient comes back in its input's dtype.
    """
    call = check_call(objective, options, hidden=hidden, weight=weight, bias=bias, labels=labels)
    return dispatch.linear_loss(hidden, weight, bias, call)


def sampled_softmax_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, num_negatives: int,
                         sampler: Union[str, Tensor] = "uniform", log_q_correction: bool = True,
                         remove_accidental_hits: bool = True, share_negatives: bool = True,
                         generator: Optional[torch.Generator] = None, **common: Any) -> Tensor:
    """Sampled softmax for catalogues too large for a full one (sequential recommenders, retrieval).

    ``hidden`` (..., N, H), ``weight`` (V, H) (the item embeddings / output head), ``labels`` (..., N)
    unshifted with ``ignore_index``. Each supervised position scores its label and ``num_negatives``
    ids drawn with replacement from ``sampler`` (see ``seqloss.sampling``): ``"uniform"``,
    ``"log_uniform"`` (Zipf over ids sorted by popularity, TensorFlow's), ``"in_batch"`` (the call's
    own labels) or a (V,) tensor of weights. Only those rows of ``weight`` are read, and its gradient
    is written only there: a call costs O((T + K)·H), not O(T·V·H).

    With ``log_q_correction`` each negative's logit is lowered by log(K·q(id)), its expected number of
    draws, while the label's logit is left as it is (it is always in the softmax, never sampled:
    Khrylchenko et al., "Correcting the LogQ Correction", RecSys 2025). The sampled sum then estimates
    the full partition function, so the loss estimates full cross-entropy. ``remove_accidental_hits``
    drops draws of the label itself (TensorFlow's ``sampled_softmax_loss`` does the same).

    ``share_negatives=True`` draws one set of K negatives per call, shared by every position (one
    (T, K) matmul); ``False`` draws K per supervised position (T·K rows gathered: T·K·H memory).
    Takes the common keywords (``shift``, ``ignore_index``, ``label_smoothing`` over the support,
    ``reduction``, ``num_items_in_batch``, ``impl``: ``"reference"`` is the dense formula on full
    logits, for the same draws). The loss is fp32; ``generator`` makes the draws reproducible (under
    ``torch.compile`` pass None: the draws then come from the global RNG).
    """
    call = check_sampled_call(hidden, weight, labels, num_negatives=num_negatives, sampler=sampler,
                              log_q_correction=log_q_correction, remove_accidental_hits=remove_accidental_hits,
                              share_negatives=share_negatives, generator=generator, options=common)
    return dispatch.sampled_loss(hidden, weight, call)
