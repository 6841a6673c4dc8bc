"""The word-level tokenizer: BLIP's BERT ids and roles, and a normal HF save/load round trip."""
from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from seqloss.workbench import scenes  # noqa: E402
from seqloss.workbench.tokenizer import (  # noqa: E402
    SPECIAL_TOKENS,
    build_tokenizer,
    caption_tokenizer,
    caption_words,
    end_of_caption_id,
    scene_tokenizer,
    unknown_words,
)


@pytest.fixture(scope="module")
def tok():
    return scene_tokenizer()


def test_special_ids_follow_blip_bert_conventions_then_sorted_words(tok):
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id,
            tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3, 4, 5, 3)
    assert tok.convert_ids_to_tokens(list(range(6, len(tok)))) == sorted(scenes.VOCABULARY)
    assert tok.padding_side == "right"


def test_a_caption_is_dec_words_sep(tok):
    ids = tok("a red circle")["input_ids"]
    assert ids == [5] + tok.convert_tokens_to_ids(["a", "red", "circle"]) + [3]
    assert tok("A Red  circle")["input_ids"] == ids           # lowercased, whitespace-split
    assert tok("a zebra")["input_ids"][2] == tok.unk_token_id
    assert set(tok("a red circle")) == {"input_ids", "attention_mask"}  # BLIP takes no token_type_ids


def test_batches_pad_on_the_right_with_zero(tok):
    batch = tok(["a circle", "a large red circle on the left"], padding=True)
    assert batch["input_ids"][0][4:] == [0] * 5 and batch["attention_mask"][0] == [1] * 4 + [0] * 5


def test_longest_possible_reference_fits_model_max_length(tok):
    longest = ("a picture of a large orange triangle in the middle a large red square on the right "
               "a small blue diamond at the bottom and a large green circle on the left on a white background")
    assert len(tok(longest)["input_ids"]) <= tok.model_max_length


def test_save_load_round_trip_and_decode(tok, tmp_path):
    tok.save_pretrained(str(tmp_path))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "there is a small purple diamond at the top"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.bos_token, loaded.sep_token, loaded.pad_token, loaded.model_max_length) == \
        ("[DEC]", "[SEP]", "[PAD]", tok.model_max_length)
    ids = loaded(text)["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.batch_decode([ids + [0, 0]], skip_special_tokens=True) == [text]


@pytest.mark.parametrize("bad", ["", "two words", "Red", "[SEP]", "dog,"])
def test_bad_vocabulary_words_are_rejected(bad):
    with pytest.raises(ValueError, match="vocabulary words"):
        build_tokenizer(["a", bad])


EVERYDAY = [["A dog running on green grass.", "A brown dog runs across the lawn!"],
            ["Two kids fly a kite at the beach", "children flying a red kite, near the sea"],
            ["A café's menu board: soup & salad (3.50)", "a man in a grey t-shirt reads the menu"]]


def test_a_vocabulary_from_captions_knows_every_word_and_decodes_them_back():
    tok = caption_tokenizer(EVERYDAY)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_token_id, tok.bos_token_id, tok.sep_token_id, tok.eos_token_id) == (0, 5, 3, 3)
    for text in (t for image in EVERYDAY for t in image):
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.sep_token_id
        assert tok.unk_token_id not in ids, text
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded == " ".join(caption_words(text))          # words, lowercased, punctuation apart
        assert tok(decoded)["input_ids"] == ids                   # and back to the same ids
    assert unknown_words(tok, EVERYDAY)[0] == {}


def test_caption_words_lowercase_and_split_punctuation():
    assert caption_words("A dog, running.") == ["a", "dog", ",", "running", "."]
    assert caption_words("Café’s") == ["café", "’", "s"]


def test_unknown_words_counts_what_a_tokenizer_cannot_say(tok):
    unknown, distinct = unknown_words(tok, [["a red zebra", "a red zebra on the grass"]])
    assert unknown == {"zebra": 2, "grass": 1} and distinct == 6


def test_a_vocabulary_needs_words():
    with pytest.raises(ValueError, match="no words"):
        caption_tokenizer([[" "]])


def test_the_end_of_a_caption_is_sep_as_blip_generates_it(tok):
    bert_style = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, sep_token="[SEP]")
    assert end_of_caption_id(tok) == end_of_caption_id(bert_style) == tok.sep_token_id   # BLIP's has no eos token
