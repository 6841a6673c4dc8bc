"""Caption metrics: exact descriptiveness on scenes, and BLEU-4 / CIDEr against references.

On scenes the truth is known, so a caption is parsed back into facts (the format of
``scenes.facts``) and compared: attribute recall = true facts mentioned / true facts, hallucination
rate = false facts mentioned / facts mentioned. BLEU-4 and CIDEr come from pycocoevalcap's scorers,
as in the SMILE repository (https://github.com/yuezih/SMILE), on lowercase whitespace tokens (its
PTBTokenizer needs Java).
"""
from __future__ import annotations

from collections.abc import Sequence

from .scenes import COLOURS, POSITION_PHRASES, SHAPES, SIZES, Fact, Scene, facts

# Attribute words that the templates place before a shape word, and the phrases they place after it.
_PRE_ATTRIBUTE = {**{c: "colour" for c in COLOURS}, **{z: "size" for z in SIZES}}
_POST_PHRASES = sorted(((tuple(p.split()), pos) for pos, phrases in POSITION_PHRASES.items() for p in phrases),
                       key=lambda item: -len(item[0]))  # longest first, should phrases ever share a prefix


def _words(text: str) -> list[str]:
    return text.lower().split()


def fact_spans(text: str) -> list[tuple[Fact, int, int]]:
    """The facts a caption states, each with the words that state it (``words[start:end]`` of the
    lowercased whitespace tokens), in the format of ``scenes.facts``.

    Each shape word is a mentioned object, ``("shape", s)``; the run of colour/size words right
    before it gives ``("colour", s, c)`` / ``("size", s, z)``, and each position phrase right after
    it (``on the left``, ``at the top``, ``in the center``/``in the middle``...) gives
    ``("position", s, p)`` — as does a position phrase that opens the shape's noun phrase (``at the
    top a red circle``), unless it closes the noun phrase before (then it is that shape's).
    Words outside this grammar state nothing.
    """
    words = _words(text)
    found: list[tuple[Fact, int, int]] = []
    after_shape: set[int] = set()  # where a phrase that closes a noun phrase starts
    for i, word in enumerate(words):
        if word not in SHAPES:
            continue
        found.append((("shape", word), i, i + 1))
        j = i - 1
        while j >= 0 and words[j] in _PRE_ATTRIBUTE:
            found.append(((_PRE_ATTRIBUTE[words[j]], word, words[j]), j, j + 1))
            j -= 1
        if j >= 0 and words[j] in ("a", "an"):
            j -= 1
        opening = next(((phrase, pos) for phrase, pos in _POST_PHRASES
                        if j + 1 - len(phrase) >= 0 and tuple(words[j + 1 - len(phrase):j + 1]) == phrase
                        and j + 1 - len(phrase) not in after_shape), None)
        if opening is not None:
            found.append((("position", word, opening[1]), j + 1 - len(opening[0]), j + 1))
        j = i + 1
        while True:
            match = next(((phrase, pos) for phrase, pos in _POST_PHRASES
                          if tuple(words[j:j + len(phrase)]) == phrase), None)
            if match is None:
                break
            after_shape.add(j)
            found.append((("position", word, match[1]), j, j + len(match[0])))
            j += len(match[0])
    return found


def parse_caption(text: str) -> frozenset[Fact]:
    """The facts a caption states (``fact_spans`` without the words). Inverts
    ``scenes.captions`` exactly; on free text (a model's output) contradictions such as "a red blue
    circle" yield both facts, so one of them counts as a hallucination."""
    return frozenset(fact for fact, _, _ in fact_spans(text))


def _check_pairs(captions: Sequence, others: Sequence, what: str) -> None:
    if len(captions) != len(others):
        raise ValueError(f"got {len(captions)} captions but {len(others)} {what}")
    if not captions:
        raise ValueError("no captions to score")


def scene_scores(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Micro-averaged over images: ``attribute_recall`` = true facts mentioned / true facts,
    ``hallucination_rate`` = false facts mentioned / facts mentioned (0.0 when nothing is mentioned).
    """
    _check_pairs(captions, scenes, "scenes")
    true_total = hit = mentioned = false = 0
    for caption, scene in zip(captions, scenes):
        truth, said = facts(scene), parse_caption(caption)
        true_total += len(truth)
        hit += len(said & truth)
        mentioned += len(said)
        false += len(said - truth)
    return {"attribute_recall": hit / true_total,
            "hallucination_rate": false / mentioned if mentioned else 0.0}


FACT_KINDS = ("shape", "colour", "size", "position")


def false_facts_by_kind(captions: Sequence[str], scenes: Sequence[Scene]) -> dict[str, dict[str, int]]:
    """Per kind of fact (``FACT_KINDS``): how many the captions state and how many of those are false.

    The hallucination rate in one number hides *what* a captioner gets wrong; a captioner that sees
    shapes and colours but not where they are shows it here (``position``: most stated ones false).
    """
    _check_pairs(captions, scenes, "scenes")
    counts = {kind: {"stated": 0, "false": 0} for kind in FACT_KINDS}
    for caption, scene in zip(captions, scenes):
        truth = facts(scene)
        for fact in parse_caption(caption):
            counts[fact[0]]["stated"] += 1
            counts[fact[0]]["false"] += fact not in truth
    return counts


def caption_lengths(captions: Sequence[str]) -> list[int]:
    """Words per caption (whitespace tokens)."""
    return [len(c.split()) for c in captions]


def text_scores(captions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """``avg_length`` (words), ``distinct_words`` (over all captions), ``bleu4`` and ``cider``.

    ``references[i]`` are the (one or more) references of ``captions[i]``. BLEU-4 is corpus-level
    (pycocoevalcap ``Bleu(4)``), CIDEr is CIDEr-D (``Cider``); its IDF comes from the references of
    all images, so a single image scores 0 by construction.
    """
    try:  # optional dependency, loaded only when scoring text
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise ImportError("text_scores needs pycocoevalcap: pip install 'seqloss[workbench]'") from err

    _check_pairs(captions, references, "reference lists")
    res = {i: [" ".join(_words(c))] for i, c in enumerate(captions)}
    gts = {}
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
        gts[i] = [" ".join(_words(r)) for r in refs]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    lengths = caption_lengths(captions)
    return {"avg_length": sum(lengths) / len(lengths),
            "distinct_words": len({w for c in captions for w in _words(c)}),
            "bleu4": float(bleu[3]), "cider": float(cider)}
