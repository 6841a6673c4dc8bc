"""A word-level Hugging Face tokenizer with BLIP's BERT conventions, for small closed vocabularies.

BLIP's text decoder reads ``[DEC]`` (its BOS) in place of ``[CLS]`` and ends a caption with ``[SEP]``;
padding is ``[PAD]`` = 0. This tokenizer keeps those roles with a vocabulary of a few dozen words, so a
small ``BlipForConditionalGeneration`` trains on CPU, and it saves as an ordinary fast tokenizer that
``AutoTokenizer.from_pretrained`` loads back.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

# Ids 0-5, in this order: [PAD]=0 as in BERT; [DEC] is BLIP's decoder BOS (30522 in BLIP's own vocab).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, DEC_ID = range(len(SPECIAL_TOKENS))


def build_tokenizer(words: Iterable[str], model_max_length: int = 48) -> PreTrainedTokenizerFast:
    """A WordLevel + WhitespaceSplit tokenizer: the special tokens at ids 0-5, then ``sorted(words)``.

    ``tok("a red circle")["input_ids"] == [DEC, a, red, circle, SEP]`` (BLIP: BOS replaces CLS at
    position 0, SEP ends the caption); text is lowercased, unknown words map to ``[UNK]``; padding is
    on the right; only ``input_ids`` and ``attention_mask`` are returned (BLIP takes no token types).
    ``eos_token`` is ``[SEP]`` too, so generation stops where BLIP's does.
    """
    vocab_words = sorted(set(words))
    for w in vocab_words:
        if not w or w != w.strip() or len(w.split()) != 1 or w != w.lower() or w in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary words must be lowercase, non-empty, without spaces and "
                             f"not special tokens; got {w!r}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(vocab_words))}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[DEC] $A [SEP]", pair="[DEC] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[DEC]", DEC_ID), ("[SEP]", SEP_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]", eos_token="[SEP]",
        model_max_length=model_max_length, padding_side="right",
        model_input_names=["input_ids", "attention_mask"])


def scene_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer of the built-in scenes vocabulary (``scenes.VOCABULARY``)."""
    from .scenes import VOCABULARY

    return build_tokenizer(VOCABULARY)
