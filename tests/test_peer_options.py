"""The options the peers have (Liger-Kernel, Cut Cross-Entropy), on the logits path and the fused head,
each against a dense formula: ``softcap`` (c·tanh(z/c) before the softmax), ``z_loss`` (ζ·lse² over
the support, PaLM's for MLE), class weights (torch's ``cross_entropy(weight=...)``; for subsets the
weight of the label's class), ``return_stats`` (loss, z-loss part, token accuracy, predicted ids)
and ``seqloss.LinearLoss``."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import seqloss
from tests.conftest import (
    IGNORE,
    MIXTURE,
    assert_close_fp32,
    assert_low_precision,
    eager_and_compiled,
    generator,
    make_labels,
)

B, N, V, H = 3, 6, 17, 5
OBJECTIVES = ("mle", "smile", "reverse_subset", "selective_eos", "subset", "mixture")


def _objective(name: str) -> tuple[Any, dict[str, Any]]:
    if name == "mixture":
        return MIXTURE, {}
    if name == "selective_eos":
        return name, dict(eos_token_id=2)
    if name == "subset":
        return name, dict(include=torch.randint(-1, V, (B, 4), generator=generator(9)))
    if name == "smile":
        return name, dict(exclude_ids=(1,))
    return name, {}


def _inputs(seed: int = 0):
    g = generator(seed)
    logits = torch.randn(B, N, V, generator=g) * 4
    hidden = torch.randn(B, N, H, generator=g)
    weight, bias = torch.randn(V, H, generator=g), torch.randn(V, generator=g) * 0.5
    labels = make_labels(B, N, vocab_size=V, seed=seed, ignored_rows=(2,) if seed % 2 else ())
    return logits, hidden, weight, bias, labels


def _grads(fn, *tensors):
    """fn(*leaves) and the gradients of its tensors (None stays None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=generator(3)) if out.dim() else None)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _on_logits(impl, logits, labels, objective, **options):
    return _grads(lambda z: seqloss.objective_loss(z, labels, objective, impl=impl, **options), logits)


def _on_head(impl, hidden, weight, bias, labels, objective, **options):
    return _grads(lambda h, w, b: seqloss.linear_loss(h, w, labels, bias=b, objective=objective, impl=impl,
                                                      **options), hidden, weight, bias)


def _assert_same(got, want):
    assert_close_fp32(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        if a is not None or b is not None:
            assert_close_fp32(a, b, "backward")


def _both_paths(impl: str, name: str, reduction: str, options: dict[str, Any], dense_logits, seed: int = 0):
    """For the logits path and the fused head: (seqloss with ``options``, the plain objective on the
    logits transformed by ``dense_logits``), values and gradients."""
    logits, hidden, weight, bias, labels = _inputs(seed)
    objective, extra = _objective(name)
    common = dict(shift=True, reduction=reduction, **extra)
    got = _grads(lambda z: seqloss.objective_loss(z, labels, objective, impl=impl, **options, **common), logits)
    want = _grads(lambda z: seqloss.objective_loss(dense_logits(z), labels, objective, impl="reference", **common),
                  logits)
    _assert_same(got, want)
    got = _grads(lambda h, w, b: seqloss.linear_loss(h, w, labels, bias=b, objective=objective, impl=impl, **options,
                                                     **common), hidden, weight, bias)
    want = _grads(lambda h, w, b: seqloss.objective_loss(dense_logits(F.linear(h, w, b)), labels, objective,
                                                         impl="reference", **common), hidden, weight, bias)
    _assert_same(got, want)


# --- softcap -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_softcap_is_the_objective_on_capped_logits(name, impl, reduction):
    c = 3.0
    _both_paths(impl, name, reduction, dict(softcap=c), lambda z: c * torch.tanh(z / c))


def test_softcap_with_label_smoothing_and_z_loss_equals_the_spec():
    logits, hidden, weight, bias, labels = _inputs(1)
    for name in OBJECTIVES:
        objective, extra = _objective(name)
        options = dict(softcap=2.5, z_loss=1e-2, label_smoothing=0.1, shift=True, **extra)
        runs = [_on_head(impl, hidden, weight, bias, labels, objective, **options) for impl in ("torch", "reference")]
        _assert_same(runs[0], runs[1])


# --- z-loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_z_loss_for_mle_is_palms(impl):
    logits, _, _, _, labels = _inputs(2)
    zeta = 1e-2
    flat, target = logits.reshape(-1, V), labels.reshape(-1)
    on = target != IGNORE

    def dense(z):
        z = z.reshape(-1, V)
        return F.cross_entropy(z, target) + zeta * (torch.logsumexp(z[on], -1) ** 2).mean()

    got = _grads(lambda z: seqloss.cross_entropy(z, labels, z_loss=zeta, impl=impl), logits)
    _assert_same(got, _grads(dense, logits))
    _ = flat


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_z_loss_equals_the_spec(name, reduction):
    """The torch engines against the dense spec, whose z-loss is lse² over the support mask."""
    logits, hidden, weight, bias, labels = _inputs(3)
    objective, extra = _objective(name)
    options = dict(z_loss=0.05, shift=True, reduction=reduction, **extra)
    runs = [_on_logits(impl, logits, labels, objective, **options) for impl in ("torch", "reference")]
    _assert_same(runs[0], runs[1])
    runs = [_on_head(impl, hidden, weight, bias, labels, objective, **options) for impl in ("torch", "reference")]
    _assert_same(runs[0], runs[1])


def test_the_specs_z_loss_is_lse_squared_over_smiles_support():
    logits = torch.randn(1, 3, 6, generator=generator(4))
    labels = torch.tensor([[1, 3, 1]])
    z_loss = seqloss.smile_loss(logits, labels, z_loss=1.0, reduction="none", impl="reference")
    plain = seqloss.smile_loss(logits, labels, reduction="none", impl="reference")
    lse = torch.stack([torch.logsumexp(logits[0, 0], 0),                # first token: every id
                       torch.logsumexp(logits[0, 1, [1, 3]], 0), torch.logsumexp(logits[0, 2, [1, 3]], 0)])
    assert_close_fp32(z_loss - plain, (lse ** 2).unsqueeze(0))


# --- class weights -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0, 1e-3])  # 1e-3: the weights of the batch's tokens sum below 1
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_class_weights_for_mle_are_torchs(impl, reduction, scale):
    logits, hidden, weight, bias, labels = _inputs(5)
    w = torch.rand(V, generator=generator(6)) * scale

    def dense(z):
        out = F.cross_entropy(z.reshape(-1, V), labels.reshape(-1), weight=w, reduction=reduction)
        return out.reshape(B, N) if reduction == "none" else out

    got = _grads(lambda z: seqloss.cross_entropy(z, labels, weight=w, impl=impl, reduction=reduction), logits)
    _assert_same(got, _grads(dense, logits))
    got = _grads(lambda h, W, b: seqloss.linear_loss(h, W, labels, bias=b, class_weight=w, impl=impl,
                                                     reduction=reduction), hidden, weight, bias)
    _assert_same(got, _grads(lambda h, W, b: dense(F.linear(h, W, b)), hidden, weight, bias))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence"])
@pytest.mark.parametrize("name", OBJECTIVES)
def test_class_weights_for_subsets_weigh_the_labels_class(name, reduction):
    """Each position's loss times w[label]; the mean divides by the sum of those weights."""
    logits, _, _, _, labels = _inputs(7)
    w = torch.rand(V, generator=generator(8)) * 2
    objective, extra = _objective(name)
    targets = torch.cat([labels[:, 1:], torch.full((B, 1), IGNORE)], 1)
    w_pos = torch.where(targets != IGNORE, w[targets.clamp(min=0)], 0.0)

    def dense(z):
        tok = seqloss.objective_loss(z, labels, objective, shift=True, reduction="none", impl="reference", **extra)
        weighted = tok * w_pos
        return {"mean": weighted.sum() / w_pos.sum(), "sum": weighted.sum(), "none": weighted,
                "sequence": weighted.sum(-1)}[reduction]

    got = _grads(lambda z: seqloss.objective_loss(z, labels, objective, weight=w, shift=True, reduction=reduction,
                                                  **extra), logits)
    _assert_same(got, _grads(dense, logits))


def test_class_weights_with_num_items_in_batch_and_all_zero_weights():
    logits, _, _, _, labels = _inputs(9)
    w = torch.rand(V, generator=generator(10))
    summed = seqloss.smile_loss(logits, labels, weight=w, reduction="sum")
    assert_close_fp32(seqloss.smile_loss(logits, labels, weight=w, num_items_in_batch=7), summed / 7)
    zero = seqloss.cross_entropy(logits, labels, weight=torch.zeros(V))
    assert zero == 0 and not torch.isnan(zero)


# --- return_stats ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["logits", "linear"])
@pytest.mark.parametrize("name", ["mle", "smile", "random_subset", "mixture"])
def test_return_stats(name, path):
    logits, hidden, weight, bias, labels = _inputs(11)
    objective, extra = _objective(name)

    def call(**options):
        if name == "random_subset":  # the z-loss part must be measured on the same random draws
            options["generator"] = generator(12)
        if path == "logits":
            return seqloss.objective_loss(logits, labels, objective, shift=True, **extra, **options)
        return seqloss.linear_loss(hidden, weight, labels, bias=bias, objective=objective, shift=True, **extra,
                                   **options)

    stats = call(z_loss=0.1, softcap=4.0, return_stats=True)
    assert isinstance(stats, seqloss.LossStats)
    assert_close_fp32(stats.loss, call(z_loss=0.1, softcap=4.0))
    assert_close_fp32(stats.loss - stats.z_loss, call(softcap=4.0))
    assert float(stats.z_loss) > 0
    scores = logits if path == "logits" else F.linear(hidden, weight, bias)
    targets = torch.cat([labels[:, 1:], torch.full((B, 1), IGNORE)], 1)
    on = targets != IGNORE
    assert torch.equal(stats.predicted_ids, torch.where(on, scores.argmax(-1), IGNORE))
    assert_close_fp32(stats.token_accuracy, (scores.argmax(-1) == targets)[on].float().mean())
    spec = call(z_loss=0.1, softcap=4.0, return_stats=True, impl="reference")
    assert_close_fp32(stats.z_loss, spec.z_loss)
    assert torch.equal(stats.predicted_ids, spec.predicted_ids)
    assert_close_fp32(stats.token_accuracy, spec.token_accuracy)


def test_return_stats_without_z_loss_or_targets():
    logits = torch.randn(2, 3, 5)
    stats = seqloss.smile_loss(logits, torch.full((2, 3), IGNORE), return_stats=True)
    assert stats.loss == 0 and stats.z_loss == 0 and stats.token_accuracy == 0
    assert stats.predicted_ids.tolist() == [[IGNORE] * 3] * 2


@pytest.mark.parametrize("path", ["logits", "linear"])
def test_return_stats_z_loss_is_the_fp64_sum_of_zeta_lse_squared(path):
    # The stat is the engines' own per-position ζ·lse² summed, not the difference of two fp32 totals.
    N, V_big, zeta = 512, 3000, 1e-4
    g = generator(21)
    hidden = torch.randn(1, N, 32, generator=g)
    weight = torch.randn(V_big, 32, generator=g) * 0.3
    labels = torch.randint(V_big, (1, N), generator=g)
    logits = (hidden @ weight.t()).detach()
    if path == "logits":
        stats = seqloss.cross_entropy(logits, labels, z_loss=zeta, return_stats=True)
    else:
        stats = seqloss.linear_loss(hidden, weight, labels, z_loss=zeta, return_stats=True)
    want = (zeta * torch.logsumexp(logits.double(), -1) ** 2).mean()
    assert abs(float(stats.z_loss) - float(want)) <= 1e-6 * float(want)


def test_return_stats_reads_no_generator_twice():
    # random_subset's draws are made once: the stats come from the same pass as the loss.
    logits, _, _, _, labels = _inputs(22)
    g = generator(23)
    before = torch.default_generator.get_state()
    seqloss.random_subset_loss(logits, labels, generator=g, z_loss=0.1, return_stats=True)
    once = g.get_state()
    g2 = generator(23)
    seqloss.random_subset_loss(logits, labels, generator=g2, z_loss=0.1)
    assert torch.equal(once, g2.get_state())
    assert torch.equal(before, torch.default_generator.get_state())


# --- the module, bad input ------------------------------------------------------------------------


def test_linear_loss_module():
    _, hidden, weight, bias, labels = _inputs(13)
    module = seqloss.LinearLoss("smile", shift=True, exclude_ids=(1,))
    assert "smile" in repr(module)
    assert_close_fp32(module(hidden, weight, labels, bias),
                      seqloss.linear_loss(hidden, weight, labels, bias=bias, objective="smile", shift=True,
                                          exclude_ids=(1,)))
    assert_close_fp32(module(hidden, weight, labels, reduction="sum"),
                      seqloss.linear_loss(hidden, weight, labels, objective="smile", shift=True, exclude_ids=(1,),
                                          reduction="sum"))


@pytest.mark.parametrize("options, error, match", [
    (dict(softcap=0.0), ValueError, "softcap must be a positive"),
    (dict(softcap="3"), TypeError, "softcap must be"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be"),
    (dict(weight=torch.ones(V + 1)), ValueError, "class weights must be a floating-point tensor of shape"),
    (dict(weight=-torch.ones(V)), ValueError, "class weights must be finite and >= 0"),
    (dict(weight=torch.ones(V), label_smoothing=0.1), ValueError, "label_smoothing"),
    (dict(weight=torch.ones(V), class_weight=torch.ones(V)), TypeError, "once"),
    (dict(return_stats=1), TypeError, "return_stats must be a bool"),
])
def test_bad_peer_options_are_named(options, error, match):
    logits, _, _, _, labels = _inputs()
    with pytest.raises(error, match=match):
        seqloss.cross_entropy(logits, labels, **options)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_peer_options_compile(path, reduction):
    logits, hidden, weight, bias, labels = _inputs(14)
    options = dict(objective=MIXTURE, softcap=3.0, z_loss=1e-2, shift=True, reduction=reduction)
    class_weight = torch.rand(V, generator=generator(15))
    if path == "logits":
        def fn(z):
            return seqloss.objective_loss(z, labels, weight=class_weight, **options)
        tensors = (logits,)
    else:
        def fn(h, w, b):
            return seqloss.linear_loss(h, w, labels, bias=b, class_weight=class_weight, **options)
        tensors = (hidden, weight, bias)
    eager, compiled = eager_and_compiled(_grads, fn, *tensors)
    _assert_same(compiled, eager)


@pytest.mark.parametrize("name", ["mle", "smile", "mixture"])
def test_peer_options_in_bf16_meet_the_low_precision_criterion(name):
    """bf16 logits: |fast - fp32 truth| <= |naive bf16 - fp32 truth| + slack (tests/conftest.py)."""
    logits, _, _, _, labels = _inputs(16)
    objective, extra = _objective(name)
    options = dict(softcap=3.0, z_loss=1e-2, shift=True, reduction="none", **extra)
    low = logits.to(torch.bfloat16)
    fast = _on_logits("torch", low, labels, objective, **options)
    naive = _on_logits("reference", low, labels, objective, **options)
    truth = _on_logits("reference", low.float(), labels, objective, **options)
    assert_low_precision(fast[0], naive[0], truth[0], torch.bfloat16, "forward", "loss")
    assert_low_precision(fast[1][0], naive[1][0], truth[1][0], torch.bfloat16, "backward", "logits gradient")
