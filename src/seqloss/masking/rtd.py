"""Replacement token detection (rtd): ELECTRA's generator-discriminator objective.

ELECTRA (Clark et al., 2020, arXiv 2003.10555): a small generator is trained with MLM on the masked
items; its samples replace them, and a discriminator learns which items were replaced.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import MaskingOutput, check_bool, check_generator, check_item_ids
from .mlm import MaskedLM


def gumbel_argmax(logits: Tensor, generator: Optional[torch.Generator], excluded: Sequence[int] = ()) -> Tensor:
    """(T,) long: one sample per row of ``logits`` (T, C) from their softmax over the ids not in
    ``excluded``, by the Gumbel-max trick: argmax(logits + G) with G = -log(-log(U)), U uniform.
    The softmax itself is never computed."""
    # One buffer, updated in place: the noise of a large (T, V) head costs a single allocation.
    # U >= the smallest normal float keeps both logs finite; U < 1 keeps -log(U) > 0.
    log_exponential = torch.rand(logits.shape, generator=generator, device=logits.device)
    log_exponential.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_()  # log(-log(U)) = -G
    scores = torch.sub(logits, log_exponential, out=log_exponential)
    if excluded:
        scores.index_fill_(1, torch.tensor(list(excluded), device=scores.device), float("-inf"))
    return scores.argmax(dim=-1)


class ReplacementTokenDetection(MaskedLM):
    """ELECTRA's targets: ``MaskedLM``'s targets and hiding (same options, modes and alignment,
    ``targets[:, i] = item_ids[:, i]`` at the masked positions) for the generator, plus
    ``corrupt`` to build the discriminator's inputs and labels from the generator's logits.

    Args:
        sample_from_batch: draw replacements among the batch's own targets (the generator scores
            the T targets of the batch, (T, T) logits) instead of over the vocabulary ((T, V)).
        The other arguments are ``MaskedLM``'s.
    """

    name = "rtd"

    def __init__(self, padding_idx: int = 0, eval_on_last_item_only: bool = True, probability: float = 0.15,
                 mask_token_id: Optional[int] = None, vocab_size: Optional[int] = None,
                 replace_probability: float = 0.8, random_probability: float = 0.1,
                 sample_from_batch: bool = False) -> None:
        super().__init__(padding_idx, eval_on_last_item_only, probability, mask_token_id, vocab_size,
                         replace_probability, random_probability)
        self.sample_from_batch = check_bool("sample_from_batch", sample_from_batch)

    def corrupt(self, item_ids: Tensor, out: MaskingOutput, generator_logits: Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """The discriminator's inputs and labels.

        Every target position of ``out`` (from ``self(item_ids, ...)``) gets an id sampled from the
        generator's softmax by Gumbel-max; the logits are detached, as in ELECTRA, where no
        gradient flows from the discriminator through the sampling into the generator.

        Args:
            item_ids: (B, L) the original items, as passed to the scheme.
            out: the scheme's output for ``item_ids`` (train or eval mode).
            generator_logits: the generator's scores at the T target positions, either (T, C) in
                row-major order (``logits[out.target_mask]``) or (B, L, C) at every position. C is
                the vocabulary size, or T with ``sample_from_batch`` (the scores of the batch's
                targets, in the same order). Samples over the vocabulary never pick
                ``padding_idx`` or ``mask_token_id``.
            generator: the random source of the sampling.

        Returns:
            corrupted_ids: (B, L) ``item_ids`` with each target position replaced by its sample.
            discriminator_labels: (B, L) bool, True exactly where the id changed (a sample equal
                to the original item counts as original, as in ELECTRA).
        """
        check_item_ids(item_ids, self.padding_idx)
        check_generator(generator)
        if not isinstance(out, MaskingOutput):
            raise TypeError(f"out must be the MaskingOutput of this scheme, got {type(out).__name__}")
        if out.target_mask.shape != item_ids.shape:
            raise ValueError(f"out.target_mask has shape {tuple(out.target_mask.shape)} but item_ids has "
                             f"{tuple(item_ids.shape)}; pass the output of a train or eval call on item_ids")
        where = out.target_mask
        originals = item_ids[where]  # (T,) in row-major order
        logits = self._target_logits(generator_logits, where, num_targets=originals.shape[0])
        corrupted = item_ids.clone()
        if originals.numel():
            excluded = () if self.sample_from_batch else self._unsampleable(logits.shape[1])
            sampled = gumbel_argmax(logits, generator, excluded)
            corrupted[where] = (originals[sampled] if self.sample_from_batch else sampled).to(item_ids.dtype)
        return corrupted, corrupted != item_ids

    def _unsampleable(self, num_ids: int) -> tuple[int, ...]:
        """The ids a replacement over ``num_ids`` ids may not be: padding and [MASK]."""
        special = tuple(i for i in (self.padding_idx, self.mask_token_id) if i is not None and i < num_ids)
        if num_ids <= len(special):
            raise ValueError(f"generator_logits has C={num_ids} ids, none of which may be sampled "
                             "besides padding_idx and mask_token_id")
        return special

    def _target_logits(self, generator_logits: Any, where: Tensor, num_targets: int) -> Tensor:
        """The (T, C) detached logits of the target positions."""
        if not isinstance(generator_logits, Tensor) or not generator_logits.is_floating_point():
            raise TypeError("generator_logits must be a floating-point torch.Tensor")
        B, L = where.shape
        if generator_logits.dim() == 3 and tuple(generator_logits.shape[:2]) == (B, L):
            logits = generator_logits.detach()[where]
        elif generator_logits.dim() == 2 and generator_logits.shape[0] == num_targets:
            logits = generator_logits.detach()
        else:
            raise ValueError(f"generator_logits must have shape (T, C) with T={num_targets} targets or "
                             f"({B}, {L}, C), got {tuple(generator_logits.shape)}")
        if self.sample_from_batch and logits.shape[1] != num_targets:
            raise ValueError(f"with sample_from_batch, generator_logits must score the {num_targets} "
                             f"targets of the batch (C={num_targets}), got C={logits.shape[1]}")
        return logits


def electra_loss(generator_loss: Tensor, discriminator_logits: Tensor, discriminator_labels: Tensor,
                 attention_mask: Tensor, discriminator_weight: float = 50.0) -> Tensor:
    """ELECTRA's objective: ``generator_loss + discriminator_weight * BCE``, where BCE is the binary
    cross-entropy of the discriminator's logits against the replaced/original labels, averaged over
    the real (non-padding) positions; 0, not NaN, when there are none. ELECTRA uses weight 50.

    Args:
        generator_loss: scalar, the generator's MLM loss.
        discriminator_logits: (B, L) or (B, L, 1), one logit per position (> 0: replaced).
        discriminator_labels: (B, L) bool or 0/1, True where the item was replaced (``corrupt``).
        attention_mask: (B, L) bool or 0/1, True at real items.
        discriminator_weight: lambda, >= 0.
    """
    for name, value in (("generator_loss", generator_loss), ("discriminator_logits", discriminator_logits)):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if generator_loss.numel() != 1:
        raise ValueError(f"generator_loss must be a scalar, got shape {tuple(generator_loss.shape)}")
    logits = discriminator_logits
    if logits.dim() == 3 and logits.shape[-1] == 1:
        logits = logits.squeeze(-1)
    for name, value in (("discriminator_labels", discriminator_labels), ("attention_mask", attention_mask)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if logits.dim() != 2 or value.shape != logits.shape:
            raise ValueError(f"{name} {tuple(value.shape)} and discriminator_logits "
                             f"{tuple(discriminator_logits.shape)} must both be (B, L)")
    if not isinstance(discriminator_weight, numbers.Real) or isinstance(discriminator_weight, bool):
        raise TypeError(f"discriminator_weight must be a float, got {type(discriminator_weight).__name__}")
    if not discriminator_weight >= 0:
        raise ValueError(f"discriminator_weight must be >= 0, got {discriminator_weight}")
    real = attention_mask.bool()
    bce = F.binary_cross_entropy_with_logits(logits, discriminator_labels.to(logits.dtype), reduction="none")
    discriminator_loss = torch.where(real, bce, 0.0).sum() / real.sum().clamp(min=1)
    return generator_loss.reshape(()) + discriminator_weight * discriminator_loss
