"""Word-level Hugging Face tokenizers with BLIP's BERT conventions, for vocabularies built from captions.

BLIP's text decoder reads ``[DEC]`` (its BOS) in place of ``[CLS]`` and ends a caption with ``[SEP]``;
padding is ``[PAD]`` = 0. These tokenizers keep those roles with a vocabulary of exactly the words
that were given (the built-in scenes' few dozen, or every word of a user's training captions), so a
small ``BlipForConditionalGeneration`` trains on CPU, and they save as ordinary fast tokenizers that
``AutoTokenizer.from_pretrained`` loads back.

Why word-level and not a subword vocabulary: a model built from scratch on a user's captions then
knows every word of them as one token (no ``[UNK]``, nothing split), SMILE's per-caption token sets
are sets of words as in the paper's analysis, and the metrics, which count words, see what the
model emits. Text is NFKC-normalised and lowercased; words are split on whitespace and each
punctuation character is a word of its own, so ``"grass."`` and ``"grass"`` share a token.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from .scenes import VOCABULARY

# Ids 0-5, in this order: [PAD]=0 as in BERT; [DEC] is BLIP's decoder BOS (30522 in BLIP's own vocab).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID, DEC_ID = range(len(SPECIAL_TOKENS))


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def caption_words(text: str) -> list[str]:
    """The words of ``text`` as these tokenizers see them: ``"A dog, running."`` → a dog , running ."""
    return [word for word, _ in _pre_tokenizer().pre_tokenize_str(_normalizer().normalize_str(text))]


def build_tokenizer(words: Iterable[str], model_max_length: int = 48) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: the special tokens at ids 0-5, then ``sorted(set(words))``.

    ``tok("a red circle")["input_ids"] == [DEC, a, red, circle, SEP]`` (BLIP: BOS replaces CLS at
    position 0, SEP ends the caption); unknown words map to ``[UNK]``; padding is on the right; only
    ``input_ids`` and ``attention_mask`` are returned (BLIP takes no token types). ``eos_token`` is
    ``[SEP]`` too, so generation stops where BLIP's does. Decoding joins the words with single
    spaces. Each word must be one word of ``caption_words`` (lowercase, no spaces, punctuation
    alone) and not a special token; ValueError names the first that is not.
    """
    vocab_words = sorted(set(words))
    for w in vocab_words:
        if not isinstance(w, str) or caption_words(w) != [w] or w in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary words must be lowercase, non-empty, without spaces, punctuation "
                             f"on its own, and not special tokens; got {w!r}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + tuple(vocab_words))}
    core = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = _normalizer()
    core.pre_tokenizer = _pre_tokenizer()
    core.post_processor = processors.TemplateProcessing(
        single="[DEC] $A [SEP]", pair="[DEC] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[DEC]", DEC_ID), ("[SEP]", SEP_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="[DEC]", eos_token="[SEP]",
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"])


def scene_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer of the built-in scenes vocabulary (``scenes.VOCABULARY``); the stage-1 cache of
    ``seqloss compare`` depends on it, so scenes keep it even though their captions would give the same words."""
    return build_tokenizer(VOCABULARY)


def caption_tokenizer(captions: Iterable[Iterable[str]]) -> PreTrainedTokenizerFast:
    """A tokenizer that knows every word of ``captions`` (a list of caption lists, one per image)."""
    words = {w for image_captions in captions for text in image_captions for w in caption_words(text)}
    if not words:
        raise ValueError("cannot build a vocabulary: the captions contain no words")
    return build_tokenizer(words)


def end_of_caption_id(tokenizer: Any) -> Any:
    """The id that ends a caption: ``[SEP]`` (BLIP's ``generate`` stops on ``sep_token_id``), else the eos id."""
    return tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id


def unknown_words(tokenizer: Any, captions: Iterable[Iterable[str]]) -> tuple[Counter, int]:
    """Words of ``captions`` (whitespace-separated, as written) that ``tokenizer`` maps to its unknown
    token, with their counts, and the number of distinct words looked at. Any HF tokenizer works."""
    words = Counter(w for image_captions in captions for text in image_captions for w in text.split())
    unk = tokenizer.unk_token_id
    if unk is None or not words:
        return Counter(), len(words)
    distinct = list(words)
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"]
    return Counter({w: words[w] for w, ids in zip(distinct, encoded) if unk in ids}), len(words)
