"""The fused LM head: ``linear_loss(h, W, y, bias=b)`` equals the dense spec on ``F.linear(h, W, b)`` logits,
in value and in all three gradients, for every objective and option, on awkward shapes, across several
chunks and blocks, in low precision (ml-cross-entropy criterion); its promises (inputs untouched,
nothing supervised gives 0, a second backward never gives a wrong gradient) and its input checks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import seqloss
import seqloss.autograd
import seqloss.grouped
import seqloss.torch_linear
from tests.conftest import (
    IGNORE,
    REDUCTIONS,
    assert_close_fp32,
    assert_low_precision,
    generator,
    make_labels,
    make_logits,
    objective_of,
    options_of,
    output_shape,
    random_grad_output,
)

B, N, H, V = 3, 7, 11, 37  # H and V not powers of two
VARIANTS = ("mle", "smile", "smile_no_first_token", "random_subset", "reverse_subset", "selective_eos",
            "subset_per_row", "subset_per_position", "subset_exclude", "mixture")


def variant(name, labels, vocab_size, seed=0):
    """(objective, options) of a variant; build afresh for every call (a random generator is consumed
    by a call, so two calls get two generators seeded the same)."""
    *lead, n = labels.shape
    g = generator(seed + 50_000)
    if name == "smile_no_first_token":
        return "smile", dict(first_token_mle=False, exclude_ids=(1 % vocab_size,))
    if name in ("subset_per_position", "subset_exclude"):  # negative padding and a duplicate in every list
        ids = torch.randint(-2, vocab_size, (*lead, n, 4) if name == "subset_per_position" else (*lead, 4),
                            generator=g)
        if ids.numel():
            ids[..., -1] = ids[..., 0]
        return "subset", {"include" if name == "subset_per_position" else "exclude": ids}
    base = "subset" if name == "subset_per_row" else name  # per-row include: member_options' subset
    return objective_of(base), options_of(base, labels, vocab_size, seed)


def make_head(vocab_size, width, seed=0):
    """weight (V, H) and bias (V,) of an LM head, scaled so that logits are O(1)."""
    return make_logits(vocab_size, width, seed=seed + 1, scale=0.5), make_logits(vocab_size, seed=seed + 2, scale=0.5)


def run_head(path, hidden, weight, labels, bias=None, *, grad_output=None, requires=(True, True, True), **kwargs):
    """The loss and the gradients (hidden, weight, bias) on fresh leaves. ``path`` is an impl of
    ``linear_loss`` or "logits": impl="reference" of ``objective_loss`` on ``F.linear`` logits."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(r)
              for t, r in zip((hidden, weight, bias), requires)]
    h, w, b = leaves
    if path == "logits":
        out = seqloss.objective_loss(F.linear(h, w, b), labels, impl="reference", **kwargs)
    else:
        out = seqloss.linear_loss(h, w, labels, bias=b, impl=path, **kwargs)
    if out.requires_grad:
        out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), tuple(None if t is None else t.grad for t in leaves)


def compare_head(name, hidden, weight, labels, bias=None, *, impl="torch", seed=0, **kwargs):
    """linear_loss(impl=impl) against the spec on logits, fp32: values and the three gradients."""
    results = []
    for path in (impl, "logits"):
        objective, options = variant(name, labels, weight.shape[0], seed)
        results.append(run_head(path, hidden, weight, labels, bias, objective=objective, **options, **kwargs))
    (fast, fast_grads), (ref, ref_grads) = results
    assert fast.shape == ref.shape and fast.dtype == torch.float32
    assert_close_fp32(fast, ref)
    for got, want, like in zip(fast_grads, ref_grads, (hidden, weight, bias)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == like.dtype and got.shape == like.shape
            assert_close_fp32(got, want, "backward")
    return fast, fast_grads


def _inputs(b=B, n=N, width=H, vocab_size=V, seed=0, **label_options):
    hidden = make_logits(b, n, width, seed=seed, scale=1.0)
    weight, bias = make_head(vocab_size, width, seed)
    return hidden, weight, bias, make_labels(b, n, vocab_size=vocab_size, seed=seed, **label_options)


# --- the full grid -----------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("num_items_in_batch", [None, 7])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("name", VARIANTS)
def test_fused_matches_reference(name, label_smoothing, reduction, shift, num_items_in_batch, with_bias):
    hidden, weight, bias, labels = _inputs(seed=1, ignored_rows=(1,))
    out_shape = output_shape(reduction, (B,), N)
    grad_output = random_grad_output(out_shape) if out_shape else None  # per-position outputs: backward recomputes
    loss, _ = compare_head(name, hidden, weight, labels, bias if with_bias else None, grad_output=grad_output,
                           label_smoothing=label_smoothing, reduction=reduction, shift=shift,
                           num_items_in_batch=num_items_in_batch)
    assert tuple(loss.shape) == out_shape
    if out_shape:
        assert (loss[1] == 0).all()  # the all-ignored row


# --- awkward shapes, impls, chunks ---------------------------------------------------------------


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 11), (3, 1, 13, 53), (3, 6, 12, 50), (2, 9, 1, 2), (1, 3, 5, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", VARIANTS)
def test_awkward_shapes(name, shape, shift):
    b, n, width, vocab_size = shape  # B, N, H, V; N = 1, H = 1, V = 1; row 0 entirely ignored
    hidden, weight, bias, labels = _inputs(b, n, width, vocab_size, seed=3, ignore_fraction=0.2, ignored_rows=(0,))
    compare_head(name, hidden, weight, labels, bias, shift=shift, label_smoothing=0.1, reduction="none",
                 grad_output=random_grad_output((b, n), 3))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", VARIANTS)
def test_extra_leading_dims(name, reduction):
    lead = (2, 3)
    hidden, (weight, bias) = make_logits(*lead, N, H, seed=5, scale=1.0), make_head(V, H, seed=5)
    labels = make_labels(*lead, N, vocab_size=V, seed=5, ignored_rows=(4,))
    out_shape = output_shape(reduction, lead, N)
    grad_output = random_grad_output(out_shape) if out_shape else None
    loss, grads = compare_head(name, hidden, weight, labels, bias, reduction=reduction, shift=True,
                               grad_output=grad_output)
    assert tuple(loss.shape) == out_shape
    # ... and equals the same batch with the leading dims flattened.
    objective, options = variant(name, labels, V)
    options = {k: v.reshape(6, *v.shape[2:]) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    flat, flat_grads = run_head("torch", hidden.reshape(6, N, H), weight, labels.reshape(6, N), bias,
                                grad_output=None if grad_output is None else grad_output.reshape(6, *out_shape[2:]),
                                objective=objective, reduction=reduction, shift=True, **options)
    assert_close_fp32(loss.reshape(flat.shape), flat)
    for got, want in zip(grads, flat_grads):
        assert_close_fp32(got.reshape(want.shape), want, "backward")


@pytest.mark.parametrize("impl", ["reference", "torch", "auto"])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_impl_matches_the_spec(name, impl):
    hidden, weight, bias, labels = _inputs(seed=6)
    loss, _ = compare_head(name, hidden, weight, labels, bias, impl=impl, shift=True, label_smoothing=0.1)
    for grad_mode in (True, False):
        objective, options = variant(name, labels, V)
        with torch.set_grad_enabled(grad_mode):
            out = seqloss.linear_loss(hidden, weight.clone().requires_grad_(True), labels, bias=bias, impl=impl,
                                      objective=objective, shift=True, label_smoothing=0.1, **options)
        assert out.requires_grad == grad_mode
        assert_close_fp32(out.detach(), loss)
        if grad_mode:  # torch and auto run the fused head, reference the dense spec on logits
            fused = type(out.grad_fn).__name__.startswith(seqloss.autograd.EngineFunction.__name__)
            assert fused == (impl != "reference")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 positions in the full-vocabulary pass, blocks of 1 group in the list pass; counts them."""
    calls = {"full_support": 0, "candidate_support": 0}

    homes = {"full_support": seqloss.torch_linear, "candidate_support": seqloss.grouped}

    def counted(name):
        inner = getattr(homes[name], name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return inner(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(seqloss.torch_linear, "MIN_CHUNK_POSITIONS", 1)
    monkeypatch.setattr(seqloss.torch_linear, "FUSED_CHUNK_ELEMENTS", 2 * V)
    monkeypatch.setattr(seqloss.grouped, "LIST_BLOCK_ELEMENTS", 1)
    for name in calls:
        monkeypatch.setattr(homes[name], name, counted(name))
    return calls


@pytest.mark.parametrize("ignore_fraction", [0.1, 0.6])  # chunks of all positions, or of the supervised ones
@pytest.mark.parametrize("reduction", ["mean", "none", "sequence"])
@pytest.mark.parametrize("name", VARIANTS)
def test_several_chunks_and_blocks(name, reduction, ignore_fraction, small_chunks):
    hidden, weight, bias, labels = _inputs(seed=7, ignore_fraction=ignore_fraction)
    out_shape = output_shape(reduction, (B,), N)
    compare_head(name, hidden, weight, labels, bias, reduction=reduction, shift=True, label_smoothing=0.1,
                 grad_output=random_grad_output(out_shape) if out_shape else None)
    assert max(small_chunks.values()) >= 3, small_chunks  # the fused pass really ran in pieces


# --- gradients: scaling, recompute, partial requires_grad -----------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", VARIANTS)
def test_scaled_loss(name, reduction):
    # Scalar outputs scale the gradients made in forward; per-position outputs recompute them in backward.
    hidden, weight, bias, labels = _inputs(seed=9)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    objective, options = variant(name, labels, V)
    out = seqloss.linear_loss(leaves[0], leaves[1], labels, bias=leaves[2], objective=objective,
                              reduction=reduction, **options)
    (out * 3).sum().backward()
    objective, options = variant(name, labels, V)
    _, want = run_head("logits", hidden, weight, labels, bias, grad_output=torch.full(out.shape, 3.0),
                       objective=objective, reduction=reduction, **options)
    for leaf, grad in zip(leaves, want):
        assert_close_fp32(leaf.grad, grad, "backward")


REQUIRES = {"hidden_only": (True, False, False), "weight_frozen": (True, False, True),
            "weight_only": (False, True, False), "bias_without_grad": (True, True, False),
            "bias_only": (False, False, True), "nothing": (False, False, False)}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("requires", REQUIRES.values(), ids=REQUIRES.keys())
@pytest.mark.parametrize("name", VARIANTS)
def test_only_some_inputs_require_grad(name, requires, reduction):
    hidden, weight, bias, labels = _inputs(seed=11)
    _, grads = compare_head(name, hidden, weight, labels, bias, requires=requires, reduction=reduction,
                            shift=True, label_smoothing=0.1,
                            grad_output=random_grad_output((B, N)) if reduction == "none" else None)
    assert [g is not None for g in grads] == list(requires)


# --- low precision -----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", VARIANTS)
def test_low_precision_criterion(name, dtype, shift, label_smoothing, reduction):
    hidden, weight, bias, labels = _inputs(seed=12)
    low = [t.to(dtype) for t in (hidden, weight, bias)]
    # O(1) gradients: above 2 one bf16 ulp (2**-6) exceeds the slack, so any single rounding would fail.
    grad_output = 0.25 * random_grad_output((B, N), 12) if reduction == "none" else None

    def run(path, tensors):
        objective, options = variant(name, labels, V)
        return run_head(path, tensors[0], tensors[1], labels, tensors[2], grad_output=grad_output,
                        objective=objective, shift=shift, label_smoothing=label_smoothing, reduction=reduction,
                        **options)

    truth = run("logits", [t.float() for t in low])  # the spec on an fp32 upcast of the same inputs
    naive = run("logits", low)                        # the spec on low-precision logits F.linear(h, W, b)
    fast = run("torch", low)
    assert fast[0].dtype == torch.float32, "losses are fp32 whatever the inputs' dtype"
    assert [g.dtype for g in fast[1]] == [dtype] * 3, "gradients come back in the inputs' dtype"
    assert_low_precision(fast[0], naive[0], truth[0], dtype, "forward", "loss")
    for what, f, n, t in zip(("hidden", "weight", "bias"), fast[1], naive[1], truth[1]):
        assert_low_precision(f, n, t, dtype, "backward", f"grad of {what}")


# --- promises ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("name", VARIANTS)
def test_inputs_are_never_modified(name, impl, reduction):
    hidden, weight, bias, labels = _inputs(seed=13)
    objective, options = variant(name, labels, V)
    tensors = dict(hidden=hidden, weight=weight, bias=bias, labels=labels,
                   **{k: v for k, v in options.items() if isinstance(v, torch.Tensor)})
    before = {k: v.clone() for k, v in tensors.items()}
    out = seqloss.linear_loss(hidden.requires_grad_(True), weight.requires_grad_(True), labels,
                              bias=bias.requires_grad_(True), objective=objective, impl=impl, shift=True,
                              label_smoothing=0.1, reduction=reduction, **options)
    out.backward(random_grad_output(out.shape))
    for key, value in tensors.items():
        assert torch.equal(value.detach(), before[key]), key


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ["all_ignored", "shift_one_position"])
@pytest.mark.parametrize("name", VARIANTS)
def test_nothing_supervised_gives_exact_zero(name, case, reduction, impl):
    labels, shift = {"all_ignored": (torch.full((2, 4), IGNORE), False),
                     "shift_one_position": (torch.tensor([[1], [2], [3]]), True)}[case]
    b, n = labels.shape
    hidden, (weight, bias) = make_logits(b, n, H, seed=14), make_head(V, H, seed=14)
    objective, options = variant(name, labels, V)
    out, grads = run_head(impl, hidden, weight, labels, bias, objective=objective, shift=shift,
                          reduction=reduction, label_smoothing=0.1, **options)
    assert tuple(out.shape) == output_shape(reduction, (b,), n)
    assert (out == 0).all()
    for grad, like in zip(grads, (hidden, weight, bias)):
        assert grad is not None and grad.shape == like.shape and (grad == 0).all()


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("name", VARIANTS)
def test_empty_batch(name, impl):
    hidden, (weight, bias) = make_logits(0, 5, H), make_head(V, H)
    labels = torch.empty(0, 5, dtype=torch.long)
    for reduction in REDUCTIONS:
        objective, options = variant(name, labels, V)  # include/exclude of shape (0, K) or (0, 5, K)
        out, grads = run_head(impl, hidden, weight, labels, bias, objective=objective, shift=True,
                              reduction=reduction, **options)
        assert tuple(out.shape) == output_shape(reduction, (0,), 5) and (out == 0).all()
        assert all(g is not None and (g == 0).all() for g in grads)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_second_backward_through_a_scalar_loss_raises(impl, reduction):
    hidden, weight, bias, labels = _inputs(seed=15)
    loss = seqloss.linear_loss(hidden.requires_grad_(True), weight, labels, bias=bias, objective="smile",
                               impl=impl, reduction=reduction)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        loss.backward()


@pytest.mark.parametrize("reduction", ["none", "sequence"])
def test_second_backward_through_a_per_position_loss_is_never_wrong(reduction):
    # Backward recomputes from the saved inputs: a retained second backward must raise or add the same again.
    hidden, weight, bias, labels = _inputs(seed=15)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    loss = seqloss.linear_loss(leaves[0], leaves[1], labels, bias=leaves[2], objective="smile", reduction=reduction)
    grad_output = random_grad_output(loss.shape)
    loss.backward(grad_output, retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves]
    try:
        loss.backward(grad_output)
    except RuntimeError:
        return
    for leaf, grad in zip(leaves, first):
        assert_close_fp32(leaf.grad, 2 * grad, "backward")


@pytest.mark.parametrize("name", VARIANTS)
def test_non_contiguous_views_and_int32_labels(name):
    bases = [make_logits(B, H, N, seed=17).requires_grad_(True),
             make_logits(H, V, seed=18, scale=0.5).requires_grad_(True),
             make_logits(2 * V, seed=19, scale=0.5).requires_grad_(True)]
    views = (bases[0].transpose(1, 2), bases[1].t(), bases[2][::2])  # (B, N, H); (V, H) as a tied embedding; (V,)
    labels = make_labels(B, N, vocab_size=V, seed=17)
    grad_output = random_grad_output((B, N), 17)
    objective, options = variant(name, labels, V)
    loss = seqloss.linear_loss(views[0], views[1], labels.int(), bias=views[2], objective=objective, shift=True,
                               label_smoothing=0.1, reduction="none", **options)
    loss.backward(grad_output)
    objective, options = variant(name, labels, V)
    want, want_grads = run_head("logits", *(v.detach().contiguous() for v in views[:2]), labels,
                                views[2].detach().contiguous(), grad_output=grad_output, objective=objective,
                                shift=True, label_smoothing=0.1, reduction="none", **options)
    assert_close_fp32(loss.detach(), want)
    for got, grad in zip((bases[0].grad.transpose(1, 2), bases[1].grad.t(), bases[2].grad[::2]), want_grads):
        assert_close_fp32(got, grad, "backward")
    assert (bases[2].grad[1::2] == 0).all()


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 7), width=st.integers(1, 9), vocab_size=st.integers(1, 40),
       seed=st.integers(0, 2**16), ignore=st.sampled_from([0.0, 0.3, 1.0]), name=st.sampled_from(VARIANTS),
       shift=st.booleans(), label_smoothing=st.sampled_from([0.0, 0.1, 0.5]), reduction=st.sampled_from(REDUCTIONS),
       with_bias=st.booleans())
def test_property_fused_matches_reference(b, n, width, vocab_size, seed, ignore, name, shift, label_smoothing,
                                          reduction, with_bias):
    # b >= 1: the empty batch is test_empty_batch.
    hidden, weight, bias, labels = _inputs(b, n, width, vocab_size, seed, ignore_fraction=ignore)
    out_shape = output_shape(reduction, (b,), n)
    compare_head(name, hidden, weight, labels, bias if with_bias else None, seed=seed, shift=shift,
                 label_smoothing=label_smoothing, reduction=reduction,
                 grad_output=random_grad_output(out_shape, seed) if out_shape else None)


def test_packed_list_parts_pad_each_block_to_its_own_longest_sequence(monkeypatch):
    """One long example, two short ones and padding whose position ids restart at every token (each
    pad its own empty sequence): the list pass scores only the three examples, padding each block to
    its own longest, and equals the examples scored one by one."""
    lengths, pads, h_size, v_size = (40, 3, 2), 30, 8, 23
    total = sum(lengths) + pads
    position_ids = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pads, dtype=torch.long)]).unsqueeze(0)
    labels = torch.randint(0, v_size, (1, total), generator=generator(1))
    labels[0, sum(lengths):] = IGNORE
    hidden = torch.randn(1, total, h_size, generator=generator(2), requires_grad=True)
    weight = torch.randn(v_size, h_size, generator=generator(3), requires_grad=True)
    gathered: list[tuple[int, ...]] = []
    groups = seqloss.grouped.groups

    def spy(*args):
        ids, slots, rows, sizes = groups(*args)
        gathered.append((*slots.shape, *sizes))
        return ids, slots, rows, sizes

    monkeypatch.setattr(seqloss.grouped, "groups", spy)
    monkeypatch.setattr(seqloss.grouped, "LIST_BLOCK_ELEMENTS", (v_size + 4) * h_size)  # blocks of ≤ 1 long group
    packed = seqloss.linear_loss(hidden, weight, labels, objective="smile", shift=True, position_ids=position_ids,
                                 reduction="sum", impl="torch")
    # SMILE's list part holds each example's targets after its first (that one is full-vocabulary MLE):
    # 38 of the long example, 1 of the 3-token one, none of the 2-token one or of the 30 pads.
    assert gathered == [(2, 38, 38, 1)]
    grads = torch.autograd.grad(packed, (hidden, weight))
    want, start = 0.0, 0
    for n in lengths:
        want = want + seqloss.linear_loss(hidden[:, start:start + n], weight, labels[:, start:start + n],
                                          objective="smile", shift=True, reduction="sum", impl="reference")
        start += n
    assert_close_fp32(packed, want)
    for got, expected in zip(grads, torch.autograd.grad(want, (hidden, weight))):
        assert_close_fp32(got, expected, "backward")
