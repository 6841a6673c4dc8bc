"""Packed sequences (``position_ids``, Hugging Face's padding-free convention): a row holding several
examples, each restarting its positions at 0, gives every objective the loss and the gradients of the
same examples as separate rows — on the logits path and the fused head, shifted or not, for every
reduction (``"sequence"``: one sum per packed example) — and the engines equal the dense spec on it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss
from tests.conftest import IGNORE, MIXTURE, REDUCTIONS, assert_close_fp32, generator

# Objectives whose per-row parts (token sets, first token) must follow the examples. random_subset
# draws per position of the batch's layout, so packing changes its draws: it is checked against the
# spec on the packed layout instead (test_random_subset_on_packed_rows_equals_the_spec).
PACKABLE = ("mle", "smile", "smile_no_first_token", "reverse_subset", "selective_eos", "subset_per_position",
            "mixture")
Tensor = torch.Tensor


@dataclass
class Batch:
    """The same examples as separate rows (``rows``) and packed (``packed``), with where each went."""

    scores: Tensor                      # (E, L, D) unpacked logits or hidden states
    labels: Tensor                      # (E, L), IGNORE padded
    include: Optional[Tensor]           # (E, L, K) per-position candidates, or None
    packed_scores: Tensor               # (R, T, D)
    packed_labels: Tensor               # (R, T)
    packed_include: Optional[Tensor]
    position_ids: Tensor                # (R, T)
    places: list[tuple[int, int, int]]  # (row, start, length) of each example in the packed batch
    real: list[int]                     # which packed examples are the real ones (not row padding)


def make_batch(lengths: list[int], rows: int, width: int, vocab_size: int, seed: int = 0,
               ignore_fraction: float = 0.3, candidates: int = 0) -> Batch:
    """Examples of the given lengths, packed in order into ``rows`` rows; short rows end with a
    padding example (labels all IGNORE) so that every row has the same length."""
    g = generator(seed)
    E, L = len(lengths), max(lengths)
    scores = torch.randn(E, L, width, generator=g)
    labels = torch.randint(0, vocab_size, (E, L), generator=g)
    labels[torch.rand(E, L, generator=g) < ignore_fraction] = IGNORE
    labels[torch.arange(L) >= torch.tensor(lengths)[:, None]] = IGNORE
    include = torch.randint(-1, vocab_size, (E, L, candidates), generator=g) if candidates else None
    groups = [list(range(E))[i::rows] for i in range(rows)]
    groups = [sorted(group) for group in groups if group]
    T = max(sum(lengths[e] for e in group) for group in groups) + 1  # room for a padding example
    R = len(groups)
    packed_scores = torch.randn(R, T, width, generator=g)
    packed_labels = torch.full((R, T), IGNORE)
    packed_include = torch.full((R, T, candidates), -1) if candidates else None
    position_ids = torch.zeros(R, T, dtype=torch.long)
    real, count = [], 0
    by_example: dict[int, tuple[int, int, int]] = {}
    for r, group in enumerate(groups):
        start = 0
        for e in group:
            n = lengths[e]
            packed_scores[r, start:start + n] = scores[e, :n]
            packed_labels[r, start:start + n] = labels[e, :n]
            if include is not None:
                packed_include[r, start:start + n] = include[e, :n]
            position_ids[r, start:start + n] = torch.arange(n)
            by_example[e] = (r, start, n)
            real.append(count)
            count += 1
            start += n
        position_ids[r, start:] = torch.arange(T - start)  # the row's padding example
        count += 1
    # The order of the packed examples is row by row; map each back to its unpacked row.
    order = [e for group in groups for e in group]
    places = [by_example[e] for e in range(E)]
    real_in_example_order = [real[order.index(e)] for e in range(E)]
    return Batch(scores, labels, include, packed_scores, packed_labels, packed_include, position_ids, places,
                 real_in_example_order)


def objective_and_options(name: str, include: Optional[Tensor], vocab_size: int) -> tuple[Any, dict[str, Any]]:
    if name == "mixture":
        return MIXTURE, {}
    if name == "smile_no_first_token":
        return "smile", dict(first_token_mle=False, exclude_ids=(1 % vocab_size,))
    if name == "smile":
        return "smile", dict(exclude_ids=(1 % vocab_size,))
    if name == "reverse_subset":
        return "reverse_subset", dict(exclude_ids=(0,))
    if name == "selective_eos":
        return "selective_eos", dict(eos_token_id=2 % vocab_size)
    if name == "subset_per_position":
        return "subset", dict(include=include)
    return name, {}


def run(path: str, impl: str, scores: Tensor, labels: Tensor, name: str, include: Optional[Tensor],
        head: tuple[Tensor, Tensor], grad_output: Optional[Tensor], **common: Any) -> tuple[Tensor, Tensor]:
    """The loss and the gradient of the scores (logits, or hidden states through ``head``)."""
    V = head[0].shape[0]
    objective, options = objective_and_options(name, include, V)
    leaf = scores.detach().clone().requires_grad_(True)
    if path == "logits":
        out = seqloss.objective_loss(leaf, labels, objective, impl=impl, **options, **common)
    else:
        weight, bias = head
        out = seqloss.linear_loss(leaf, weight, labels, bias=bias, objective=objective, impl=impl, **options,
                                  **common)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), leaf.grad


def check_packed_equals_unpacked(batch: Batch, name: str, path: str, impl: str, reduction: str, shift: bool,
                                 vocab_size: int, head: tuple[Tensor, Tensor], seed: int = 0) -> None:
    E, L = batch.labels.shape
    g = generator(seed + 1)
    grad_rows = grad_packed = None
    if reduction == "none":
        grad_rows = torch.randn(E, L, generator=g)
        grad_packed = torch.zeros(batch.packed_labels.shape)
        for e, (r, s, n) in enumerate(batch.places):
            grad_packed[r, s:s + n] = grad_rows[e, :n]
    elif reduction == "sequence":
        grad_rows = torch.randn(E, generator=g)
        grad_packed = torch.zeros(int((batch.position_ids == 0).sum()))
        grad_packed[batch.real] = grad_rows
    common = dict(reduction=reduction, shift=shift)
    rows, rows_grad = run(path, impl, batch.scores, batch.labels, name, batch.include, head, grad_rows, **common)
    packed, packed_grad = run(path, impl, batch.packed_scores, batch.packed_labels, name, batch.packed_include,
                              head, grad_packed, position_ids=batch.position_ids, **common)
    if reduction == "none":
        for e, (r, s, n) in enumerate(batch.places):
            assert_close_fp32(packed[r, s:s + n], rows[e, :n])
            assert_close_fp32(rows[e, n:], torch.zeros(L - n))
    elif reduction == "sequence":
        assert packed.shape == (int((batch.position_ids == 0).sum()),)
        assert_close_fp32(packed[batch.real], rows)
    else:
        assert_close_fp32(packed, rows)
    covered = torch.zeros(batch.packed_labels.shape, dtype=torch.bool)
    for e, (r, s, n) in enumerate(batch.places):
        assert_close_fp32(packed_grad[r, s:s + n], rows_grad[e, :n], "backward")
        covered[r, s:s + n] = True
    assert_close_fp32(packed_grad[~covered], torch.zeros_like(packed_grad[~covered]), "backward")  # padding


def make_head(vocab_size: int, width: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = generator(seed + 7)
    return torch.randn(vocab_size, width, generator=g) * 0.5, torch.randn(vocab_size, generator=g) * 0.5


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), rows=st.integers(1, 2),
       V=st.integers(3, 17), seed=st.integers(0, 2**16), name=st.sampled_from(PACKABLE),
       path=st.sampled_from(["logits", "linear"]), reduction=st.sampled_from(REDUCTIONS), shift=st.booleans(),
       ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_a_packed_row_equals_its_examples_as_rows(lengths, rows, V, seed, name, path, reduction, shift, ignore):
    H = 6
    width = V if path == "logits" else H
    batch = make_batch(lengths, rows, width, V, seed, ignore, candidates=3 if name == "subset_per_position" else 0)
    head = make_head(V, H, seed)
    check_packed_equals_unpacked(batch, name, path, "torch", reduction, shift, V, head, seed)


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("name", PACKABLE)
def test_the_spec_packed_equals_the_spec_unpacked(name, shift, path):
    V, H = 13, 5
    batch = make_batch([4, 1, 5, 3], 2, V if path == "logits" else H, V, seed=3,
                       candidates=3 if name == "subset_per_position" else 0)
    check_packed_equals_unpacked(batch, name, path, "reference", "none", shift, V, make_head(V, H))


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), rows=st.integers(1, 2),
       seed=st.integers(0, 2**16), name=st.sampled_from(PACKABLE + ("random_subset",)),
       path=st.sampled_from(["logits", "linear"]), shift=st.booleans(),
       reduction=st.sampled_from(["mean", "none"]), eps=st.sampled_from([0.0, 0.1]))
def test_torch_on_packed_rows_equals_the_spec(lengths, rows, seed, name, path, shift, reduction, eps):
    V, H = 11, 6
    batch = make_batch(lengths, rows, V if path == "logits" else H, V, seed,
                       candidates=3 if name == "subset_per_position" else 0)
    head = make_head(V, H, seed)
    results = {}
    for impl in ("torch", "reference"):
        extra = dict(num_samples=3, generator=generator(seed)) if name == "random_subset" else {}
        results[impl] = run_with(path, impl, batch, name, head, shift=shift, reduction=reduction,
                                 label_smoothing=eps, **extra)
    assert_close_fp32(results["torch"][0], results["reference"][0])
    assert_close_fp32(results["torch"][1], results["reference"][1], "backward")


def run_with(path: str, impl: str, batch: Batch, name: str, head: tuple[Tensor, Tensor], **common: Any):
    """``run`` on the packed layout of ``batch``; extra options (random draws) pass through."""
    extra = {k: common.pop(k) for k in ("num_samples", "generator") if k in common}
    grad = torch.randn(batch.packed_labels.shape, generator=generator(5)) if common["reduction"] == "none" else None
    if name == "random_subset":
        leaf = batch.packed_scores.detach().clone().requires_grad_(True)
        if path == "logits":
            out = seqloss.random_subset_loss(leaf, batch.packed_labels, position_ids=batch.position_ids, impl=impl,
                                             **extra, **common)
        else:
            out = seqloss.linear_loss(leaf, head[0], batch.packed_labels, bias=head[1], objective="random_subset",
                                      position_ids=batch.position_ids, impl=impl, **extra, **common)
        out.backward(torch.ones_like(out) if grad is None else grad)
        return out.detach(), leaf.grad
    return run(path, impl, batch.packed_scores, batch.packed_labels, name, batch.packed_include, head, grad,
               position_ids=batch.position_ids, **common)


def test_smile_sets_and_first_tokens_follow_the_examples():
    """A worked case: two examples in one row; the second's first supervised token uses every id, and
    each example's softmax runs over its own labels only."""
    V = 6
    logits = torch.randn(1, 5, V, generator=generator(0))
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    position_ids = torch.tensor([[0, 1, 0, 1, 2]])
    out = seqloss.smile_loss(logits, labels, position_ids=position_ids, reduction="none")
    z = logits[0]
    expected = torch.stack([
        torch.logsumexp(z[0], 0) - z[0, 1],                    # first token of example 1: all V ids
        torch.logsumexp(z[1, [1, 2]], 0) - z[1, 2],             # example 1's set {1, 2}
        torch.logsumexp(z[2], 0) - z[2, 3],                     # first token of example 2
        torch.logsumexp(z[3, [3, 4, 5]], 0) - z[3, 4],          # example 2's set {3, 4, 5}
        torch.logsumexp(z[4, [3, 4, 5]], 0) - z[4, 5],
    ])
    assert_close_fp32(out[0], expected)


def test_shifted_packed_rows_never_predict_the_next_examples_first_token():
    logits = torch.randn(1, 5, 7, generator=generator(1))
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    out = seqloss.cross_entropy(logits, labels, shift=True, position_ids=torch.tensor([[0, 1, 0, 1, 2]]),
                                reduction="none")
    assert out[0, 1] == 0 and out[0, 4] == 0 and bool((out[0, [0, 2, 3]] > 0).all())


def test_without_position_ids_nothing_changes():
    logits = torch.randn(2, 6, 9, generator=generator(2))
    labels = torch.randint(0, 9, (2, 6), generator=generator(3))
    arange = torch.arange(6).expand(2, 6)
    for objective in ("mle", "smile", "reverse_subset"):
        plain = seqloss.objective_loss(logits, labels, objective, reduction="none", shift=True)
        same = seqloss.objective_loss(logits, labels, objective, reduction="none", shift=True, position_ids=arange)
        torch.testing.assert_close(same, plain)
        sums = seqloss.objective_loss(logits, labels, objective, reduction="sequence", position_ids=arange)
        torch.testing.assert_close(sums, seqloss.objective_loss(logits, labels, objective, reduction="sequence"))


def test_leading_dims_and_modules_take_position_ids():
    V = 7
    batch = make_batch([3, 2, 4], 1, V, V, seed=4)
    logits = batch.packed_scores.unsqueeze(0)                  # (1, R, T, V)
    labels, position_ids = batch.packed_labels.unsqueeze(0), batch.position_ids.unsqueeze(0)
    expected = seqloss.smile_loss(batch.scores, batch.labels)
    assert_close_fp32(seqloss.smile_loss(logits, labels, position_ids=position_ids), expected)
    assert_close_fp32(seqloss.SmileLoss()(logits, labels, position_ids=position_ids), expected)
    mixture = seqloss.ObjectiveLoss(MIXTURE)
    assert_close_fp32(mixture(logits, labels, position_ids=position_ids), mixture(batch.scores, batch.labels))


@pytest.mark.parametrize("bad, error, match", [
    (torch.zeros(1, 4), TypeError, "position_ids must hold integer"),
    (torch.zeros(1, 3, dtype=torch.long), ValueError, "position_ids shape"),
    (torch.tensor([[0, 1, -1, 0]]), ValueError, "position_ids must be >= 0"),
    ([[0, 1, 2, 3]], TypeError, "position_ids must be a torch.Tensor"),
])
def test_bad_position_ids_are_named(bad, error, match):
    with pytest.raises(error, match=match):
        seqloss.cross_entropy(torch.randn(1, 4, 5), torch.zeros(1, 4, dtype=torch.long), position_ids=bad)


def test_position_ids_are_not_modified():
    position_ids = torch.tensor([[0, 1, 0, 1]])
    before = position_ids.clone()
    seqloss.smile_loss(torch.randn(1, 4, 5), torch.tensor([[1, 2, 3, 4]]), position_ids=position_ids, shift=True)
    assert torch.equal(position_ids, before)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("name", ["smile", "reverse_subset", "subset_per_position", "mixture"])
def test_packed_rows_compile(name, path, reduction):
    """torch.compile(fullgraph=True) traces packed rows (sequences bounded by B·N while tracing) and
    equals eager in values and gradients."""
    V, H = 11, 6
    batch = make_batch([3, 2, 4], 2, V if path == "logits" else H, V, seed=6,
                       candidates=3 if name == "subset_per_position" else 0)
    head = make_head(V, H, seed=6)
    grad = torch.randn(batch.packed_labels.shape, generator=generator(8)) if reduction == "none" else None

    def loss(scores):
        return run_loss(path, scores, batch, name, head, reduction)

    torch._dynamo.reset()
    try:
        results = []
        for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
            leaf = batch.packed_scores.clone().requires_grad_(True)
            out = fn(leaf)
            out.backward(torch.ones_like(out) if grad is None else grad)
            results.append((out.detach(), leaf.grad))
    finally:
        torch._dynamo.reset()
    assert_close_fp32(results[1][0], results[0][0])
    assert_close_fp32(results[1][1], results[0][1], "backward")


def run_loss(path: str, scores: Tensor, batch: Batch, name: str, head: tuple[Tensor, Tensor], reduction: str):
    objective, options = objective_and_options(name, batch.packed_include, head[0].shape[0])
    common = dict(position_ids=batch.position_ids, shift=True, reduction=reduction, **options)
    if path == "logits":
        return seqloss.objective_loss(scores, batch.packed_labels, objective, **common)
    return seqloss.linear_loss(scores, head[0], batch.packed_labels, bias=head[1], objective=objective, **common)


def test_sequence_sums_of_packed_rows_refuse_to_compile():
    batch = make_batch([2, 3], 1, 5, 5)
    fn = torch.compile(lambda x: seqloss.cross_entropy(x, batch.packed_labels, position_ids=batch.position_ids,
                                                       reduction="sequence"), fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception, match="reduction='sequence' with position_ids"):
            fn(batch.packed_scores)
    finally:
        torch._dynamo.reset()
