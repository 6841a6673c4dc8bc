"""``turns=True``: each maximal run of supervised labels (a conversation turn) is its own sequence —
its own SMILE token set and first-token MLE. Property: a row with several turns scores like copies
of the row that each keep one turn's labels, on every path, shifted or not, packed or not."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss
from tests.conftest import IGNORE, MIXTURE, assert_close_fp32, generator

OBJECTIVES = ("mle", "smile", "smile_no_first_token", "reverse_subset", "mixture")


def _objective(name: str) -> tuple[Any, dict[str, Any]]:
    if name == "mixture":
        return MIXTURE, {}
    if name == "smile_no_first_token":
        return "smile", dict(first_token_mle=False)
    return name, {}


def runs(labels: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every maximal run of supervised labels."""
    out = []
    for b, row in enumerate(labels.tolist()):
        n = 0
        while n < len(row):
            if row[n] == IGNORE:
                n += 1
                continue
            start = n
            while n < len(row) and row[n] != IGNORE:
                n += 1
            out.append((b, start, n))
    return out


def one_turn_copies(scores: torch.Tensor, labels: torch.Tensor, shift: bool):
    """Copies of each row keeping one turn's labels; with ``shift`` a turn is a run of the labels
    that are targets after the shift (position 0's label never is)."""
    targets = labels.clone()
    if shift:
        targets[:, 0] = IGNORE
    copies, rows = [], []
    for b, start, end in runs(targets):
        kept = torch.full_like(labels[b], IGNORE)
        kept[start:end] = targets[b, start:end]
        copies.append(kept)
        rows.append(b)
    if not copies:
        return scores[:0], labels[:0], []
    return scores[rows], torch.stack(copies), rows


def _loss(path, impl, scores, labels, name, head, **common):
    objective, options = _objective(name)
    leaf = scores.detach().clone().requires_grad_(True)
    if path == "logits":
        out = seqloss.objective_loss(leaf, labels, objective, impl=impl, **options, **common)
    else:
        out = seqloss.linear_loss(leaf, head[0], labels, bias=head[1], objective=objective, impl=impl, **options,
                                  **common)
    out.sum().backward()
    return out.detach(), leaf.grad


def check_turns_equal_copies(path: str, impl: str, scores, labels, name: str, head, shift: bool) -> None:
    turns, turns_grad = _loss(path, impl, scores, labels, name, head, turns=True, shift=shift, reduction="none")
    copy_scores, copy_labels, rows = one_turn_copies(scores, labels, shift)
    expected = torch.zeros_like(turns)
    expected_grad = torch.zeros_like(turns_grad)
    if rows:
        copies, copies_grad = _loss(path, impl, copy_scores, copy_labels, name, head, shift=shift, reduction="none")
        index = torch.tensor(rows)
        expected.index_add_(0, index, copies)
        expected_grad.index_add_(0, index, copies_grad)
    assert_close_fp32(turns, expected)
    assert_close_fp32(turns_grad, expected_grad, "backward")


def _batch(B, N, V, width, seed, gap):
    g = generator(seed)
    labels = torch.randint(0, V, (B, N), generator=g)
    labels[torch.rand(B, N, generator=g) < gap] = IGNORE
    return torch.randn(B, N, width, generator=g), labels


def _head(V, H, seed):
    g = generator(seed + 3)
    return torch.randn(V, H, generator=g) * 0.5, torch.randn(V, generator=g) * 0.5


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 9), V=st.integers(2, 15), seed=st.integers(0, 2**16),
       name=st.sampled_from(OBJECTIVES), path=st.sampled_from(["logits", "linear"]), shift=st.booleans(),
       gap=st.sampled_from([0.0, 0.3, 0.6]), impl=st.sampled_from(["torch", "reference"]))
def test_turns_score_like_one_turn_copies(B, N, V, seed, name, path, shift, gap, impl):
    H = 5
    scores, labels = _batch(B, N, V, V if path == "logits" else H, seed, gap)
    check_turns_equal_copies(path, impl, scores, labels, name, _head(V, H, seed), shift)


def test_each_turn_gets_its_own_set_and_first_token():
    V = 8
    logits = torch.randn(1, 6, V, generator=generator(1))
    labels = torch.tensor([[1, 2, IGNORE, IGNORE, 3, 4]])
    out = seqloss.smile_loss(logits, labels, turns=True, reduction="none")[0]
    z = logits[0]
    expected = [torch.logsumexp(z[0], 0) - z[0, 1], torch.logsumexp(z[1, [1, 2]], 0) - z[1, 2], 0.0, 0.0,
                torch.logsumexp(z[4], 0) - z[4, 3], torch.logsumexp(z[5, [3, 4]], 0) - z[5, 4]]
    assert_close_fp32(out, torch.tensor([float(e) for e in expected]))
    whole_row = seqloss.smile_loss(logits, labels, reduction="none")[0]
    assert not torch.isclose(whole_row[4], out[4])        # without turns the second turn is no first token


def test_turns_and_packing_together_equal_the_spec():
    V, N = 9, 12
    logits = torch.randn(2, N, V, generator=generator(2))
    labels = torch.randint(0, V, (2, N), generator=generator(3))
    labels[:, [2, 3, 8]] = IGNORE
    position_ids = torch.tensor([list(range(6)) + list(range(6)), list(range(4)) + list(range(8))])
    for name in OBJECTIVES:
        objective, options = _objective(name)
        got = [seqloss.objective_loss(logits, labels, objective, impl=impl, turns=True, position_ids=position_ids,
                                      shift=True, reduction="none", **options) for impl in ("torch", "reference")]
        assert_close_fp32(got[0], got[1])


def test_turns_must_be_a_bool():
    with pytest.raises(TypeError, match="turns must be a bool"):
        seqloss.smile_loss(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), turns=1)


@pytest.mark.parametrize("shape", [(0, 4), (1, 1)])
def test_turns_on_empty_and_one_position_batches(shape):
    logits = torch.randn(*shape, 5, requires_grad=True)
    labels = torch.full(shape, IGNORE)
    loss = seqloss.smile_loss(logits, labels, turns=True, position_ids=torch.zeros(shape, dtype=torch.long))
    loss.backward()
    assert loss == 0 and logits.grad is not None and not logits.grad.any()
