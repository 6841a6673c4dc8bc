"""Every public function, with ``torch.nn.functional``-style signatures: the objectives on logits,
``linear_loss`` (the fused LM head) and ``sampled_softmax_loss``. Each validates its call once
(``_validate``) and hands it to the one dispatch point (``dispatch.py``). The keywords are typed
(``seqloss.call.ObjectiveOptions`` and its kin, PEP 692), so a type checker rejects a misspelt one.

Their keywords are documented once, on the typed dicts of ``seqloss.call``: ``seqloss.call.BaseOptions``
and ``seqloss.call.CommonOptions`` (every objective), ``seqloss.call.MemberOptions``
(each objective's own). ``return_stats=True`` returns a ``seqloss.call.LossStats`` instead of
the loss.

Losses are fp32 whatever the inputs' dtype, with fp32 math inside, also under ``torch.autocast``;
each gradient comes back in its input's dtype. Every function compiles with
``torch.compile(fullgraph=True)`` (traced, the engines are opaque custom ops; see
``seqloss.autograd``); under tracing, checks that read tensor values are skipped, and ``random_subset`` draws from the global
RNG (Dynamo cannot trace a ``torch.Generator``: pass ``generator=None``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union, overload

import torch
from torch import Tensor
from typing_extensions import Unpack

from . import dispatch
from ._validate import check_linear_call, check_logits_call
from ._validate_sampled import check_sampled_call
from .call import BaseOptions, LinearOptions, LogitsOptions, LossStats, Objective, ObjectiveOptions

# With return_stats=True a function returns a LossStats (the loss and its extras) instead of the loss.
Loss = Union[Tensor, LossStats]


def _options(options: Any, return_stats: bool, **member: Any) -> dict[str, Any]:
    """The keywords of a call on logits as the validator takes them: class weights come as torch's
    ``weight=`` and are checked as ``class_weight``."""
    options = dict(options)
    if "class_weight" in options:
        raise TypeError("pass class weights once, as weight= (as F.cross_entropy takes them); class_weight= is "
                        "linear_loss's, whose weight is the head")
    class_weight = options.pop("weight", None)
    return {**options, "class_weight": class_weight, "return_stats": return_stats, **member}


@overload
def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = ..., *,
                   return_stats: Literal[False] = ..., **options: Unpack[ObjectiveOptions]) -> Tensor: ...
@overload
def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = ..., *,
                   return_stats: Literal[True], **options: Unpack[ObjectiveOptions]) -> LossStats: ...
@overload
def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = ..., *,
                   return_stats: bool, **options: Unpack[ObjectiveOptions]) -> Loss: ...


def objective_loss(logits: Tensor, labels: Tensor, objective: Objective = "mle", *, return_stats: bool = False,
                   **options: Unpack[ObjectiveOptions]) -> Loss:
    """Any objective, or a weighted mixture such as ``{"mle": 0.01, "smile": 0.99}``.

    ``logits`` (..., N, V) and ``labels`` (..., N). Options of the mixture's members (``exclude_ids``,
    ``eos_token_id``, ...) go to the members that accept them; an option none accepts is a TypeError.
    """
    call = check_logits_call(objective, _options(options, return_stats), logits, labels)
    return dispatch.logits_loss(logits, call)


@overload
def cross_entropy(logits: Tensor, labels: Tensor, *, return_stats: Literal[False] = ...,
                  **common: Unpack[LogitsOptions]) -> Tensor: ...
@overload
def cross_entropy(logits: Tensor, labels: Tensor, *, return_stats: Literal[True],
                  **common: Unpack[LogitsOptions]) -> LossStats: ...
@overload
def cross_entropy(logits: Tensor, labels: Tensor, *, return_stats: bool, **common: Unpack[LogitsOptions]) -> Loss: ...


def cross_entropy(logits: Tensor, labels: Tensor, *, return_stats: bool = False,
                  **common: Unpack[LogitsOptions]) -> Loss:
    """Maximum likelihood: softmax over the whole vocabulary (``F.cross_entropy`` semantics)."""
    return dispatch.logits_loss(logits, check_logits_call("mle", _options(common, return_stats), logits, labels))


@overload
def smile_loss(logits: Tensor, labels: Tensor, *, first_token_mle: bool = ..., exclude_ids: Sequence[int] = ...,
               return_stats: Literal[False] = ..., **common: Unpack[LogitsOptions]) -> Tensor: ...
@overload
def smile_loss(logits: Tensor, labels: Tensor, *, first_token_mle: bool = ..., exclude_ids: Sequence[int] = ...,
               return_stats: Literal[True], **common: Unpack[LogitsOptions]) -> LossStats: ...
@overload
def smile_loss(logits: Tensor, labels: Tensor, *, first_token_mle: bool = ..., exclude_ids: Sequence[int] = ...,
               return_stats: bool, **common: Unpack[LogitsOptions]) -> Loss: ...


def smile_loss(logits: Tensor, labels: Tensor, *, first_token_mle: bool = True, exclude_ids: Sequence[int] = (),
               return_stats: bool = False, **common: Unpack[LogitsOptions]) -> Loss:
    """SMILE, semipermeable MLE (Yue et al., NeurIPS 2023, arXiv 2306.13460).

    The softmax at each position of row b runs over the ids that occur as labels in row b (minus
    ``exclude_ids``), so the model is not pushed away from words it could add to a caption. With
    ``first_token_mle`` the first supervised position of each row uses the whole vocabulary.
    """
    options = _options(common, return_stats, first_token_mle=first_token_mle, exclude_ids=exclude_ids)
    return dispatch.logits_loss(logits, check_logits_call("smile", options, logits, labels))


@overload
def random_subset_loss(logits: Tensor, labels: Tensor, *, num_samples: int = ...,
                       generator: Optional[torch.Generator] = ..., exclude_ids: Sequence[int] = ...,
                       return_stats: Literal[False] = ..., **common: Unpack[LogitsOptions]) -> Tensor: ...
@overload
def random_subset_loss(logits: Tensor, labels: Tensor, *, num_samples: int = ...,
                       generator: Optional[torch.Generator] = ..., exclude_ids: Sequence[int] = ...,
                       return_stats: Literal[True], **common: Unpack[LogitsOptions]) -> LossStats: ...
@overload
def random_subset_loss(logits: Tensor, labels: Tensor, *, num_samples: int = ...,
                       generator: Optional[torch.Generator] = ..., exclude_ids: Sequence[int] = ...,
                       return_stats: bool, **common: Unpack[LogitsOptions]) -> Loss: ...


def random_subset_loss(logits: Tensor, labels: Tensor, *, num_samples: int = 10,
                       generator: Optional[torch.Generator] = None, exclude_ids: Sequence[int] = (),
                       return_stats: bool = False, **common: Unpack[LogitsOptions]) -> Loss:
    """Random subsetting (SMILE paper, ablation): the label plus ``num_samples`` ids drawn uniformly
    from [0, V) with replacement at each position, minus ``exclude_ids``."""
    options = _options(common, return_stats, num_samples=num_samples, generator=generator, exclude_ids=exclude_ids)
    return dispatch.logits_loss(logits, check_logits_call("random_subset", options, logits, labels))


@overload
def reverse_subset_loss(logits: Tensor, labels: Tensor, *, exclude_ids: Sequence[int] = ...,
                        return_stats: Literal[False] = ..., **common: Unpack[LogitsOptions]) -> Tensor: ...
@overload
def reverse_subset_loss(logits: Tensor, labels: Tensor, *, exclude_ids: Sequence[int] = ...,
                        return_stats: Literal[True], **common: Unpack[LogitsOptions]) -> LossStats: ...
@overload
def reverse_subset_loss(logits: Tensor, labels: Tensor, *, exclude_ids: Sequence[int] = ...,
                        return_stats: bool, **common: Unpack[LogitsOptions]) -> Loss: ...


def reverse_subset_loss(logits: Tensor, labels: Tensor, *, exclude_ids: Sequence[int] = (),
                        return_stats: bool = False, **common: Unpack[LogitsOptions]) -> Loss:
    """Reverse subsetting (SMILE paper, ablation): the label plus every id that does *not* occur as a
    label in its row, minus ``exclude_ids``."""
    options = _options(common, return_stats, exclude_ids=exclude_ids)
    return dispatch.logits_loss(logits, check_logits_call("reverse_subset", options, logits, labels))


@overload
def selective_eos_loss(logits: Tensor, labels: Tensor, *, eos_token_id: int, return_stats: Literal[False] = ...,
                       **common: Unpack[LogitsOptions]) -> Tensor: ...
@overload
def selective_eos_loss(logits: Tensor, labels: Tensor, *, eos_token_id: int, return_stats: Literal[True],
                       **common: Unpack[LogitsOptions]) -> LossStats: ...
@overload
def selective_eos_loss(logits: Tensor, labels: Tensor, *, eos_token_id: int, return_stats: bool,
                       **common: Unpack[LogitsOptions]) -> Loss: ...


def selective_eos_loss(logits: Tensor, labels: Tensor, *, eos_token_id: int, return_stats: bool = False,
                       **common: Unpack[LogitsOptions]) -> Loss:
    """Selective EOS ("Less is More", Yue et al., ACL 2024, arXiv 2402.14545): every id except EOS,
    unless the label is EOS — the model is never pushed to end early, only taught where to end."""
    options = _options(common, return_stats, eos_token_id=eos_token_id)
    return dispatch.logits_loss(logits, check_logits_call("selective_eos", options, logits, labels))


@overload
def subset_cross_entropy(logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = ...,
                         exclude: Optional[Tensor] = ..., return_stats: Literal[False] = ...,
                         **common: Unpack[LogitsOptions]) -> Tensor: ...
@overload
def subset_cross_entropy(logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = ...,
                         exclude: Optional[Tensor] = ..., return_stats: Literal[True],
                         **common: Unpack[LogitsOptions]) -> LossStats: ...
@overload
def subset_cross_entropy(logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = ...,
                         exclude: Optional[Tensor] = ..., return_stats: bool,
                         **common: Unpack[LogitsOptions]) -> Loss: ...


def subset_cross_entropy(logits: Tensor, labels: Tensor, *, include: Optional[Tensor] = None,
                         exclude: Optional[Tensor] = None, return_stats: bool = False,
                         **common: Unpack[LogitsOptions]) -> Loss:
    """Cross-entropy over explicit candidates (sampled softmax); the label is always a candidate.

    ``include`` (..., K) per row or (..., N, K) per label position (same leading shape as the labels,
    shifted with them), or ``exclude`` (..., K) per row; negative entries are padding.
    """
    options = _options(common, return_stats, include=include, exclude=exclude)
    return dispatch.logits_loss(logits, check_logits_call("subset", options, logits, labels))


@overload
def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = ...,
                objective: Objective = ..., return_stats: Literal[False] = ...,
                **options: Unpack[LinearOptions]) -> Tensor: ...
@overload
def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = ...,
                objective: Objective = ..., return_stats: Literal[True], **options: Unpack[LinearOptions]) -> LossStats: ...
@overload
def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = ...,
                objective: Objective = ..., return_stats: bool, **options: Unpack[LinearOptions]) -> Loss: ...


def linear_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                objective: Objective = "mle", return_stats: bool = False, **options: Unpack[LinearOptions]) -> Loss:
    """Any objective on ``hidden @ weight.T + bias`` without materialising those logits (the fused LM head).

    ``hidden`` (..., N, H), ``weight`` (V, H) (``nn.Linear`` / ``lm_head.weight`` layout), ``bias``
    (V,) or None, ``labels`` (..., N) unshifted. Takes every option of ``objective_loss``, class
    weights as ``class_weight=``; ``impl="reference"`` builds the logits and runs the dense spec.
    Dtypes may differ: under ``torch.autocast`` the head runs in autocast's dtype (as ``F.linear``
    would), elsewhere in the widest of the three; the softmax math is fp32 and each gradient comes
    back in its input's dtype.
    """
    call = check_linear_call(objective, {**options, "return_stats": return_stats}, hidden, weight, bias, labels)
    return dispatch.linear_loss(hidden, weight, bias, call)


def sampled_softmax_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, num_negatives: int,
                         sampler: Union[str, Tensor] = "uniform", log_q_correction: bool = True,
                         remove_accidental_hits: bool = True, share_negatives: bool = True,
                         generator: Optional[torch.Generator] = None, **common: Unpack[BaseOptions]) -> Tensor:
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
    Takes the keywords every loss takes (``seqloss.call.BaseOptions``; smoothing spreads over the
    sampled support, packed examples end the shift; ``impl="reference"`` is the dense formula on
    full logits, for the same draws). The loss is fp32; ``generator`` makes the draws reproducible (under
    ``torch.compile`` pass None: the draws then come from the global RNG).
    """
    call = check_sampled_call(hidden, weight, labels, num_negatives=num_negatives, sampler=sampler,
                              log_q_correction=log_q_correction, remove_accidental_hits=remove_accidental_hits,
                              share_negatives=share_negatives, generator=generator, options=common)
    return dispatch.sampled_loss(hidden, weight, call)
