"""sampled_softmax_loss: the gathered-rows engine against the dense formula (values and gradients), the
dense formula against its definition, and the estimator against the full softmax."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import seqloss
from seqloss import reference
from tests.conftest import IGNORE, assert_close_fp32, generator, make_labels

SAMPLERS = ("uniform", "log_uniform", "in_batch", "weights")


def _sampler(name: str, V: int, seed: int = 0):
    if name != "weights":
        return name
    weights = torch.rand(V, generator=generator(seed + 5))
    weights[::3] = 0.0  # ids of zero weight are never drawn
    return weights


def _loss_and_grads(hidden, weight, labels, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = seqloss.sampled_softmax_loss(h, w, labels, **kwargs)
    out.backward(torch.randn(out.shape, generator=generator(7)) if out.dim() else None)
    return out.detach(), h.grad, w.grad


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), N=st.integers(1, 6), H=st.integers(1, 9), V=st.integers(2, 40),
       K=st.integers(1, 30), sampler=st.sampled_from(SAMPLERS), share=st.booleans(), correct=st.booleans(),
       hits=st.booleans(), shift=st.booleans(), smoothing=st.sampled_from([0.0, 0.2]),
       reduction=st.sampled_from(["mean", "sum", "none", "sequence"]), seed=st.integers(0, 1000))
def test_torch_engine_equals_the_dense_formula(B, N, H, V, K, sampler, share, correct, hits, shift, smoothing,
                                               reduction, seed):
    hidden = torch.randn(B, N, H, generator=generator(seed))
    weight = torch.randn(V, H, generator=generator(seed + 1))
    labels = make_labels(B, N, vocab_size=V, seed=seed, ignored_rows=(0,) if B > 1 else ())
    options = dict(num_negatives=K, sampler=_sampler(sampler, V, seed), share_negatives=share,
                   log_q_correction=correct, remove_accidental_hits=hits, shift=shift, label_smoothing=smoothing,
                   reduction=reduction)
    fast = _loss_and_grads(hidden, weight, labels, impl="torch", generator=generator(seed + 2), **options)
    dense = _loss_and_grads(hidden, weight, labels, impl="reference", generator=generator(seed + 2), **options)
    assert_close_fp32(fast[0], dense[0])
    for f, d in zip(fast[1:], dense[1:]):
        assert_close_fp32(f, d, "backward")


def _by_definition(z, y, negatives, log_expected, correct, hits, smoothing):
    """One position, written term by term: the label once, then each draw."""
    terms = [(float(z[y]), True)]
    for v, lowering in zip(negatives.tolist(), log_expected.tolist()):
        if hits and v == y:
            continue
        terms.append((float(z[v]) - (lowering if correct else 0.0), False))
    lse = math.log(sum(math.exp(s) for s, _ in terms))
    nll = lse - float(z[y])
    mean_nll = sum(lse - s for s, _ in terms) / len(terms)
    return (1 - smoothing) * nll + smoothing * mean_nll


@pytest.mark.parametrize("correct", [False, True])
@pytest.mark.parametrize("hits", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_the_dense_formula_is_its_definition_on_a_fixed_candidate_set(correct, hits, smoothing):
    V = 9
    logits = torch.randn(2, 4, V, generator=generator(3))
    labels = torch.tensor([[1, IGNORE, 4, 4], [0, 8, IGNORE, 2]])
    negatives = torch.tensor([4, 4, 7, 0, 2])  # duplicates, and hits of several labels
    log_expected = torch.tensor([0.3, 0.3, -1.0, 2.0, 0.5])
    out = reference.sampled_loss(logits, labels, negatives, log_expected, shift=False, ignore_index=IGNORE,
                                 label_smoothing=smoothing, reduction="none", log_q_correction=correct,
                                 remove_accidental_hits=hits)
    for b in range(2):
        for n in range(4):
            y = int(labels[b, n])
            expected = 0.0 if y == IGNORE else _by_definition(logits[b, n], y, negatives, log_expected, correct,
                                                              hits, smoothing)
            assert out[b, n].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def _catalogue(V: int, H: int = 16, seed: int = 0):
    hidden = torch.randn(4, 32, H, generator=generator(seed))
    weight = torch.randn(V, H, generator=generator(seed + 1)) * 0.5
    labels = make_labels(4, 32, vocab_size=V, seed=seed)
    return hidden, weight, labels


@pytest.mark.parametrize("share", [True, False])
def test_uniform_with_many_negatives_is_within_three_percent_of_the_full_softmax(share):
    hidden, weight, labels = _catalogue(V=3000)
    full = seqloss.linear_loss(hidden, weight, labels)
    K = 20_000 if share else 2_000
    sampled = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=K, share_negatives=share,
                                           generator=generator(1))
    assert abs(sampled.item() - full.item()) <= 0.03 * full.item()
    # Without the correction the sampled softmax is a different (smaller) objective.
    plain = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=K, share_negatives=share,
                                         log_q_correction=False, generator=generator(1))
    assert abs(plain.item() - full.item()) > 0.03 * full.item()


@pytest.mark.parametrize("sampler", ["log_uniform", "weights"])
def test_a_skewed_sampler_with_the_correction_also_estimates_the_full_softmax(sampler):
    hidden, weight, labels = _catalogue(V=2000, seed=4)
    full = seqloss.linear_loss(hidden, weight, labels)
    weights = torch.rand(2000, generator=generator(9)) + 0.1
    sampled = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=50_000,
                                           sampler=weights if sampler == "weights" else sampler,
                                           generator=generator(2))
    assert abs(sampled.item() - full.item()) <= 0.03 * full.item()


def test_the_weight_gradient_touches_only_the_scored_rows():
    hidden, weight, labels = _catalogue(V=500)
    w = weight.clone().requires_grad_(True)
    g = generator(3)
    seqloss.sampled_softmax_loss(hidden, w, labels, num_negatives=20, generator=g).backward()
    g = generator(3)
    from seqloss.sampling import draw_negatives
    supervised = labels[labels != IGNORE]
    drawn = draw_negatives("uniform", 20, 500, labels.clamp(min=0).reshape(-1), (labels != IGNORE).reshape(-1),
                           False, g).ids
    scored = torch.zeros(500, dtype=torch.bool)
    scored[supervised] = True
    scored[drawn] = True
    assert w.grad[~scored].abs().max() == 0
    assert (w.grad[scored].abs().sum(1) > 0).all()


def test_reductions_and_num_items_in_batch_agree():
    hidden, weight, labels = _catalogue(V=100)
    kwargs = dict(num_negatives=10)
    none = seqloss.sampled_softmax_loss(hidden, weight, labels, reduction="none", generator=generator(0), **kwargs)
    assert none.shape == labels.shape and (none[labels == IGNORE] == 0).all()
    seq = seqloss.sampled_softmax_loss(hidden, weight, labels, reduction="sequence", generator=generator(0), **kwargs)
    total = seqloss.sampled_softmax_loss(hidden, weight, labels, reduction="sum", generator=generator(0), **kwargs)
    mean = seqloss.sampled_softmax_loss(hidden, weight, labels, generator=generator(0), **kwargs)
    scaled = seqloss.sampled_softmax_loss(hidden, weight, labels, num_items_in_batch=7, generator=generator(0),
                                          **kwargs)
    count = int((labels != IGNORE).sum())
    assert_close_fp32(seq, none.sum(-1))
    assert_close_fp32(total, none.sum())
    assert_close_fp32(mean, none.sum() / count)
    assert_close_fp32(scaled, none.sum() / 7)


def test_item_counts_are_sampler_weights_as_they_come():
    """Counts from ``bincount`` (int64) draw exactly as the same counts as floats."""
    hidden, weight, labels = _catalogue(V=50)
    counts = torch.bincount(labels[labels >= 0], minlength=50) + 1
    as_ints = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=9, sampler=counts,
                                           generator=torch.Generator().manual_seed(0))
    as_floats = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=9, sampler=counts.double(),
                                             generator=torch.Generator().manual_seed(0))
    assert_close_fp32(as_ints, as_floats)


def test_nothing_supervised_gives_zero_and_no_nan():
    hidden, weight, _ = _catalogue(V=50)
    labels = torch.full(hidden.shape[:2], IGNORE)
    for sampler in ("uniform", "in_batch"):
        loss = seqloss.sampled_softmax_loss(hidden.requires_grad_(), weight, labels, num_negatives=5, sampler=sampler)
        loss.backward()
        assert loss.item() == 0 and torch.isfinite(hidden.grad).all()


def test_low_precision_inputs_give_an_fp32_loss_and_gradients_in_their_dtype():
    hidden, weight, labels = _catalogue(V=200)
    h = hidden.bfloat16().requires_grad_(True)
    w = weight.bfloat16().requires_grad_(True)
    loss = seqloss.sampled_softmax_loss(h, w, labels, num_negatives=30, generator=generator(0))
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    truth = seqloss.sampled_softmax_loss(h.float(), w.float(), labels, num_negatives=30, generator=generator(0))
    assert abs(loss.item() - truth.item()) < 1e-2 * truth.item()


def test_inputs_are_not_modified_and_a_seed_reproduces_the_loss():
    hidden, weight, labels = _catalogue(V=100)
    copies = [t.clone() for t in (hidden, weight, labels)]
    first = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=8, generator=generator(5))
    again = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=8, generator=generator(5))
    assert first.item() == again.item()
    for before, after in zip(copies, (hidden, weight, labels)):
        assert torch.equal(before, after)


def test_the_module_wraps_the_function():
    hidden, weight, labels = _catalogue(V=100)
    module = seqloss.SampledSoftmaxLoss(num_negatives=8, sampler="log_uniform", label_smoothing=0.1)
    expected = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=8, sampler="log_uniform",
                                            label_smoothing=0.1, generator=generator(1))
    assert_close_fp32(module(hidden, weight, labels, generator=generator(1)), expected)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(num_negatives=0), ValueError, "num_negatives"),
    (dict(num_negatives=2.5), TypeError, "num_negatives"),
    (dict(num_negatives=4, sampler="zipf"), ValueError, "sampler"),
    (dict(num_negatives=4, sampler=torch.ones(3)), ValueError, "sampler"),
    (dict(num_negatives=4, sampler=-torch.ones(20)), ValueError, "sampler"),
    (dict(num_negatives=4, sampler=torch.zeros(20)), ValueError, "positive sum"),
    (dict(num_negatives=4, sampler=[0.5] * 20), TypeError, "sampler"),
    (dict(num_negatives=4, log_q_correction=1), TypeError, "log_q_correction"),
    (dict(num_negatives=4, share_negatives="yes"), TypeError, "share_negatives"),
    (dict(num_negatives=4, generator=0), TypeError, "generator"),
    (dict(num_negatives=4, objective="smile"), TypeError, "objective"),
    (dict(num_negatives=4, turns=True), TypeError, "turns"),
    (dict(num_negatives=4, position_ids=torch.zeros(2, 4, dtype=torch.long)), ValueError, "position_ids"),
    (dict(num_negatives=4, reduction="avg"), ValueError, "reduction"),
    (dict(num_negatives=4, impl="triton"), ValueError, "impl='triton'"),
])
def test_bad_arguments_are_named(kwargs, error, words):
    hidden, weight = torch.randn(2, 3, 4), torch.randn(20, 4)
    labels = torch.randint(0, 20, (2, 3))
    with pytest.raises(error, match=words):
        seqloss.sampled_softmax_loss(hidden, weight, labels, **kwargs)


def test_bad_tensors_are_named():
    hidden, weight = torch.randn(2, 3, 4), torch.randn(20, 4)
    with pytest.raises(ValueError, match="labels"):
        seqloss.sampled_softmax_loss(hidden, weight, torch.full((2, 3), 20), num_negatives=4)
    with pytest.raises(ValueError, match="weight width"):
        seqloss.sampled_softmax_loss(hidden, torch.randn(20, 5), torch.zeros(2, 3, dtype=torch.long), num_negatives=4)


def test_per_position_negatives_scored_in_many_chunks_equal_the_dense_formula(monkeypatch):
    from seqloss import torch_sampled
    monkeypatch.setattr(torch_sampled, "CHUNK_ELEMENTS", 50)  # a few positions per chunk
    hidden, weight, labels = _catalogue(V=30)
    options = dict(num_negatives=12, share_negatives=False, label_smoothing=0.1)
    fast = _loss_and_grads(hidden, weight, labels, impl="torch", generator=generator(4), **options)
    dense = _loss_and_grads(hidden, weight, labels, impl="reference", generator=generator(4), **options)
    assert_close_fp32(fast[0], dense[0])
    for f, d in zip(fast[1:], dense[1:]):
        assert_close_fp32(f, d, "backward")


def test_a_second_backward_is_refused_not_wrong():
    hidden, weight, labels = _catalogue(V=50)
    h = hidden.clone().requires_grad_(True)
    loss = seqloss.sampled_softmax_loss(h, weight, labels, num_negatives=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_autocast_leaves_the_math_in_fp32():
    hidden, weight, labels = _catalogue(V=200)
    expected = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=30, generator=generator(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = seqloss.sampled_softmax_loss(hidden, weight, labels, num_negatives=30, generator=generator(0))
    assert got.dtype == torch.float32
    assert_close_fp32(got, expected)


@pytest.mark.parametrize("share, sampler", [(True, "uniform"), (False, "log_uniform"), (True, "in_batch"),
                                            (False, "weights")])
def test_compiles_with_fullgraph_and_equals_eager(share, sampler):
    torch._dynamo.reset()
    hidden, weight, labels = _catalogue(V=40)
    options = dict(num_negatives=7, share_negatives=share, sampler=_sampler(sampler, 40), label_smoothing=0.1,
                   shift=True, reduction="sum")

    def run(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        torch.manual_seed(0)  # Dynamo cannot trace a torch.Generator: both draw from the global RNG
        loss = fn(h, w, labels)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    def loss_fn(h, w, y):
        return seqloss.sampled_softmax_loss(h, w, y, **options)

    eager = run(loss_fn)
    compiled = run(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    for c, e in zip(compiled, eager):
        assert_close_fp32(c, e, "backward")
    torch._dynamo.reset()
