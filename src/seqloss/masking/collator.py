"""``DataCollator``: the masking schemes as a ``transformers``-style collator (``Trainer(data_collator=...)``).

    collator = seqloss.masking.DataCollator("mlm", padding_idx=0, mask_token_id=1, vocab_size=V, seed=0)
    batch = collator([{"input_ids": [5, 9, 7]}, {"input_ids": [3, 4]}])
    # input_ids (B, L) right-padded, attention_mask (B, L), labels (B, L) with -100 off target

Works on any list of mappings with an ``"input_ids"`` sequence of item or token ids (lists, tuples
or 1-D tensors, any lengths); no tokenizer is involved.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .clm import CausalLM
from .common import IGNORE_INDEX, MaskingScheme, check_int
from .mlm import MaskedLM
from .plm import PermutationLM, identity_mapping, permutation_mask
from .registry import get
from .rtd import ReplacementTokenDetection

COLLATOR_MODES = ("train", "eval")


class DataCollator:
    """Right-pads a list of examples and builds a scheme's targets for a Hugging Face model.

    Output (a dict of tensors): ``input_ids`` (B, L) long, right-padded with ``padding_idx`` and
    corrupted as the scheme corrupts them; ``attention_mask`` (B, L) long, 1 at the items; ``labels``
    (B, L) long, -100 off target; for plm ``perm_mask`` and ``target_mapping`` (B, L, L) float32,
    as ``XLNetLMHeadModel`` takes them. Keys other than ``input_ids`` and ``labels`` are passed
    through: stacked when they are numbers or equal-shape tensors, else left as a list.

    Labels follow each model family's convention, so the model's own loss trains the scheme:

    * ``"mlm"`` (``BertForMaskedLM``, BERT4Rec): a label at its own position; ``mask_token_id`` is
      required, since a Hugging Face model reads ``input_ids`` only and must not see its targets;
    * ``"clm"`` (``GPT2LMHeadModel``, SASRec): labels **unshifted** (the label of the prediction
      made after item i sits at i + 1): the model shifts them itself;
    * ``"plm"`` (``XLNetLMHeadModel``): labels at their own positions, ``target_mapping`` the identity.

    ``"rtd"`` is not a collator: ELECTRA corrupts its inputs with a generator model's predictions
    inside the training step (``seqloss.masking.get("rtd")`` and ``scheme.corrupt``).

    **Evaluation.** ``transformers.Trainer`` hands the same collator to its training and evaluation
    loaders and says nothing to it about which is which (the model's ``training`` flag is no guide:
    the next training batch is collated before ``Trainer`` switches the model back from ``eval()``,
    and worker processes hold copies). Eval-mode masking is deterministic, so it is fixed once, in
    the examples: pass ``Trainer(eval_dataset=collator.eval_examples(examples))``. Those examples carry
    their ``labels`` (and masked ``input_ids``), and the collator only pads examples that already
    have labels. Nothing else needs setting: ``input_ids`` and ``labels`` are the model's own
    arguments, so ``remove_unused_columns`` may stay True (set it False only to keep extra keys).
    ``mode="eval"`` makes a collator that masks every batch in eval mode (for your own eval loop).

    **Randomness.** With ``seed``, each process draws from its own generator: the main process from
    ``seed``; a DataLoader worker from ``seed`` mixed with the seed torch gives that worker (its
    ``get_worker_info().seed``: distinct per worker and per epoch, reproducible under the Trainer's
    seed), so workers never repeat each other's masks, nor a fresh epoch's workers the last epoch's.
    Without ``seed``, from torch's global RNG (which DataLoader seeds per worker and epoch as well).

    Args:
        scheme_or_name: "clm", "mlm" or "plm" (configured with ``options``), or a ``MaskingScheme``.
        padding_idx: the padding id (must match a given scheme's).
        mode: "train" (default) or "eval": how examples without ``labels`` are masked.
        seed: seeds the masking draws, see above.
        max_length: keep only the last ``max_length`` items of longer examples (the most recent
            ones, as sequential recommenders do); None keeps all.
        options: the scheme's options (``probability``, ``mask_token_id``, ``vocab_size``, ...).
    """

    def __init__(self, scheme_or_name: Union[str, MaskingScheme], padding_idx: int = 0, *, mode: str = "train",
                 seed: Optional[int] = None, max_length: Optional[int] = None, **options: Any) -> None:
        padding_idx = check_int("padding_idx", padding_idx, minimum=0)
        if isinstance(scheme_or_name, MaskingScheme):
            if options:
                raise TypeError(f"options {sorted(options)} are for a scheme name; configure the given scheme instead")
            if scheme_or_name.padding_idx != padding_idx:
                raise ValueError(f"padding_idx={padding_idx} differs from the scheme's padding_idx="
                                 f"{scheme_or_name.padding_idx}")
            scheme = scheme_or_name
        elif isinstance(scheme_or_name, str):
            scheme = get(scheme_or_name, padding_idx=padding_idx, **options)
        else:
            raise TypeError(f"scheme_or_name must be a scheme name or a MaskingScheme, got "
                            f"{type(scheme_or_name).__name__}")
        if isinstance(scheme, ReplacementTokenDetection):
            raise ValueError("rtd has no collator: ELECTRA corrupts inputs with a generator model inside the "
                             "training step; use seqloss.masking.get('rtd') and scheme.corrupt(...)")
        if isinstance(scheme, MaskedLM):
            if scheme.mask_token_id is None:
                raise ValueError("mlm needs mask_token_id in a collator: a Hugging Face model reads input_ids only, "
                                 "so targets must be replaced by a [MASK] id (e.g. tokenizer.mask_token_id)")
            if not scheme.eval_on_last_item_only:
                raise ValueError("mlm's eval_on_last_item_only=False gives causal-layout targets, which a "
                                 "bidirectional model would see; keep it True in a collator")
        if not isinstance(scheme, (CausalLM, MaskedLM, PermutationLM)):
            raise TypeError(f"no collator convention for {type(scheme).__name__}")
        if mode not in COLLATOR_MODES:
            raise ValueError(f"mode must be one of {COLLATOR_MODES}, got {mode!r}")
        self.scheme = scheme
        self.padding_idx = padding_idx
        self.mode = mode
        self.seed = None if seed is None else check_int("seed", seed, minimum=0)
        self.max_length = None if max_length is None else check_int("max_length", max_length, minimum=1)
        self._generators: dict[int, torch.Generator] = {}

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate ``features``: mask those without ``labels`` in ``self.mode``, pad those with them."""
        if not features:
            raise ValueError("features must hold at least one example")
        with_labels = ["labels" in f for f in features]
        if any(with_labels) and not all(with_labels):
            raise ValueError("features mix examples with labels (from eval_examples) and without; "
                             "collate them separately")
        item_ids, lengths = self._pad([f.get("input_ids") for f in features], "input_ids")
        if all(with_labels):
            labels, label_lengths = self._pad([f["labels"] for f in features], "labels", fill=IGNORE_INDEX)
            if not torch.equal(lengths, label_lengths):
                raise ValueError("each example's labels must be as long as its input_ids")
            perm_mask = None
            if isinstance(self.scheme, PermutationLM):  # eval order: left to right
                perm_mask = permutation_mask(labels != IGNORE_INDEX, torch.arange(labels.shape[1]).unsqueeze(0))
            batch = self._batch(item_ids, labels, lengths, perm_mask)
        else:
            out = self.scheme(item_ids, self.mode, generator=self._generator())
            batch = self._batch(out.input_ids, self._labels(out.targets), lengths, out.perm_mask)
        for key in features[0]:
            if key not in ("input_ids", "labels"):
                batch[key] = _stack([f.get(key) for f in features])
        return batch

    def eval_examples(self, examples: Iterable[Mapping[str, Any]], chunk: int = 1024) -> list[dict[str, Any]]:
        """``examples`` with their eval-mode targets fixed: each a dict with masked ``input_ids`` and
        ``labels`` (lists of the example's length) and its other keys. Pass them as ``Trainer``'s
        ``eval_dataset``: the collator pads them as they are."""
        examples = list(examples)
        out: list[dict[str, Any]] = []
        for start in range(0, len(examples), chunk):
            part = examples[start:start + chunk]
            item_ids, lengths = self._pad([e.get("input_ids") for e in part], "input_ids")
            masked = self.scheme(item_ids, "eval")
            labels = self._labels(masked.targets)
            for e, ids, row, n in zip(part, masked.input_ids.tolist(), labels.tolist(), lengths.tolist()):
                extra = {k: v for k, v in e.items() if k not in ("input_ids", "labels")}
                out.append({"input_ids": ids[:n], "labels": row[:n], **extra})
        return out

    # --- pieces --------------------------------------------------------------------------------

    def _generator(self) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        info = torch.utils.data.get_worker_info()
        worker = -1 if info is None else info.seed  # a worker's seed changes with every epoch's workers
        if worker not in self._generators:
            mixed = self.seed if info is None else hash((self.seed, info.seed)) & ((1 << 63) - 1)
            self._generators[worker] = torch.Generator().manual_seed(mixed)
        return self._generators[worker]

    def _pad(self, rows: list[Any], key: str, fill: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """(B, L) long right-padded rows and their lengths (B,); the last ``max_length`` entries kept."""
        lists = []
        for i, row in enumerate(rows):
            if row is None:
                raise ValueError(f"example {i} has no {key!r}")
            values = row.tolist() if isinstance(row, Tensor) else list(row)
            if any(isinstance(v, (list, tuple)) for v in values):
                raise ValueError(f"example {i}: {key} must be a flat sequence of ids")
            lists.append(values if self.max_length is None else values[-self.max_length:])
        lengths = torch.tensor([len(v) for v in lists], dtype=torch.long)
        L = int(lengths.max())
        pad = self.padding_idx if fill is None else fill
        padded = torch.full((len(lists), L), pad, dtype=torch.long)
        for i, values in enumerate(lists):
            if values:
                padded[i, :len(values)] = torch.as_tensor(values, dtype=torch.long)
        if fill is None:  # item ids: padding_idx inside an example would cut it short
            inside = (padded == self.padding_idx) & (torch.arange(L) < lengths.unsqueeze(1))
            if bool(inside.any()):
                row = int(inside.any(dim=1).nonzero()[0])
                raise ValueError(f"example {row}: input_ids holds padding_idx={self.padding_idx} among its items")
        return padded, lengths

    def _labels(self, targets: Tensor) -> Tensor:
        """Scheme targets → the model family's labels (clm: unshifted, the model shifts them)."""
        if not isinstance(self.scheme, CausalLM):
            return targets
        labels = torch.full_like(targets, IGNORE_INDEX)
        labels[:, 1:] = targets[:, :-1]
        return labels

    def _batch(self, input_ids: Tensor, labels: Tensor, lengths: Tensor, perm_mask: Optional[Tensor]) -> dict[str, Any]:
        B, L = input_ids.shape
        attention_mask = (torch.arange(L) < lengths.unsqueeze(1)).long()
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if perm_mask is not None:
            batch["perm_mask"] = perm_mask
            batch["target_mapping"] = identity_mapping(B, L, input_ids.device)  # a broadcast view
        return batch

    def __getstate__(self) -> dict[str, Any]:
        # Generators stay in their process: a pickled copy (a spawned worker) seeds its own.
        return {**self.__dict__, "_generators": {}}

    def __repr__(self) -> str:
        return f"DataCollator({self.scheme!r}, mode={self.mode!r}, seed={self.seed}, max_length={self.max_length})"


def _stack(values: list[Any]) -> Any:
    """Numbers → a tensor; equal-shape tensors → stacked; anything else stays a list."""
    if all(isinstance(v, (int, float, bool)) for v in values):
        return torch.tensor(values)
    if all(isinstance(v, Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
        return torch.stack(values)
    return values
