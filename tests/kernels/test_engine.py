"""The Triton kernels, run by Triton's interpreter on CPU tensors, against the dense spec: every
objective and option on the logits path and the fused head, values and gradients, awkward shapes,
several tiles and splits, low precision (ml-cross-entropy criterion). Skipped without Triton."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

pytest.importorskip("triton")

import seqloss  # noqa: E402
from seqloss import kernels  # noqa: E402
from tests.conftest import (  # noqa: E402
    ACCUMULATED,
    OBJECTIVES_AND_MIXTURE,
    REDUCTIONS,
    assert_low_precision,
    batches,
    compare_impls,
    generator,
    loss_and_grad,
    make_labels,
    make_logits,
    objective_of,
    options_of,
    output_shape,
    random_grad_output,
)
from tests.test_torch_linear import VARIANTS, _inputs, compare_head, run_head, variant  # noqa: E402

pytestmark = pytest.mark.skipif(kernels.unavailable_reason(torch.device("cpu")) is not None,
                                reason="the kernels run on CPU tensors only under TRITON_INTERPRET=1")

B, N, V = 3, 7, 37


def _grid(names):
    """Every name × label smoothing × reduction, with a case number; shift, num_items_in_batch and the
    bias turn with the case (see ``_rotate``), so a small grid still meets every value."""
    return [pytest.param(name, eps, reduction, names.index(name) + REDUCTIONS.index(reduction),
                         id=f"{name}-{eps}-{reduction}")
            for name in names for eps in (0.0, 0.1) for reduction in REDUCTIONS]


def _rotate(case: int):
    return dict(shift=case % 2 == 1, num_items_in_batch=(None, 9)[case // 2 % 2]), case % 3 != 0


# --- the logits path -----------------------------------------------------------------------------


@pytest.mark.parametrize("name, label_smoothing, reduction, case", _grid(OBJECTIVES_AND_MIXTURE))
def test_logits_kernels_match_reference(name, label_smoothing, reduction, case):
    options, _ = _rotate(case)
    logits = make_logits(B, N, V, seed=case)
    labels = make_labels(B, N, vocab_size=V, seed=case, ignored_rows=(1,))
    out_shape = output_shape(reduction, (B,), N)
    grad_output = random_grad_output(out_shape, case) if out_shape else None
    compare_impls(name, logits, labels, impl="triton", grad_output=grad_output, label_smoothing=label_smoothing,
                  reduction=reduction, seed=case, **options)


@pytest.mark.parametrize("shape", [(2, 1, 53), (2, 9, 2), (1, 3, 1), (0, 4, 5), (2, 3, 5, 6)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_logits_awkward_shapes(name, shape):
    logits = make_logits(*shape, seed=5)
    labels = make_labels(*shape[:-1], vocab_size=shape[-1], seed=5, ignore_fraction=0.2)
    compare_impls(name, logits, labels, impl="triton", label_smoothing=0.1, reduction="none",
                  grad_output=random_grad_output(shape[:-1], 5))


@pytest.mark.parametrize("objective", [{"smile": 0.6, "reverse_subset": 0.4}, {"random_subset": 0.5, "mle": 0.5}],
                         ids=["list_first", "random_then_full"])
def test_logits_mixtures_that_add_into_a_zeroed_gradient(objective):
    logits, labels = make_logits(B, N, V, seed=6), make_labels(B, N, vocab_size=V, seed=6)

    def extra():  # a fresh generator per call: both impls draw the same candidates
        return dict(num_samples=3, generator=torch.Generator().manual_seed(0)) if "random_subset" in objective else {}

    results = [loss_and_grad(seqloss.objective_loss, logits, labels, objective=objective, impl=impl, **extra())
               for impl in ("triton", "reference")]
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=5e-4, rtol=5e-4)


def test_logits_non_contiguous_and_untouched():
    base = make_logits(V, N, B, seed=7)
    logits = base.permute(2, 1, 0)  # (B, N, V) view with V not the fastest dimension
    labels = make_labels(B, N, vocab_size=V, seed=7)
    before = base.clone()
    compare_impls("smile", logits, labels, impl="triton")
    assert torch.equal(base, before)


@settings(max_examples=15, deadline=None)
@given(batches())
def test_logits_property(batch):
    logits, labels, seed = batch
    compare_impls("mixture", logits, labels, impl="triton", label_smoothing=0.05, seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", OBJECTIVES_AND_MIXTURE)
def test_logits_low_precision_criterion(name, dtype):
    truth_logits = make_logits(B, N, V, seed=8)
    labels = make_labels(B, N, vocab_size=V, seed=8)
    grad_output = random_grad_output((B, N), 8)

    def run(logits, impl):
        return loss_and_grad(seqloss.objective_loss, logits, labels, grad_output=grad_output, impl=impl,
                             objective=objective_of(name), reduction="none", label_smoothing=0.1,
                             **options_of(name, labels, V))

    truth, naive, fast = run(truth_logits, "reference"), run(truth_logits.to(dtype), "reference"), \
        run(truth_logits.to(dtype), "triton")
    assert fast[0].dtype == torch.float32 and fast[1].dtype == dtype
    assert_low_precision(fast[0], naive[0], truth[0], dtype, "forward")
    assert_low_precision(fast[1], naive[1], truth[1], dtype, "backward")


# --- the fused head ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, label_smoothing, reduction, case", _grid(VARIANTS))
def test_fused_kernels_match_reference(name, label_smoothing, reduction, case):
    options, with_bias = _rotate(case)
    hidden, weight, bias, labels = _inputs(seed=case, ignored_rows=(1,))
    out_shape = output_shape(reduction, (3,), 7)
    grad_output = random_grad_output(out_shape, case) if out_shape else None
    compare_head(name, hidden, weight, labels, bias if with_bias else None, impl="triton", seed=case,
                 grad_output=grad_output, label_smoothing=label_smoothing, reduction=reduction, **options)


@pytest.mark.parametrize("shape", [(2, 5, 7, 11), (3, 1, 13, 53), (2, 9, 1, 2), (1, 3, 5, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", VARIANTS)
def test_fused_awkward_shapes(name, shape):
    b, n, width, vocab_size = shape
    hidden, weight, bias, labels = _inputs(b, n, width, vocab_size, seed=3, ignore_fraction=0.2, ignored_rows=(0,))
    compare_head(name, hidden, weight, labels, bias, impl="triton", shift=True, label_smoothing=0.1,
                 reduction="none", grad_output=random_grad_output((b, n), 3))


@pytest.mark.parametrize("name", ["mle", "smile", "subset_per_position", "reverse_subset"])
def test_fused_many_tiles(name):
    # 40 positions per row and V = 100: several slot blocks, column blocks and splits per launch.
    hidden, weight, bias, labels = _inputs(3, 40, 40, 100, seed=4, ignore_fraction=0.1)
    compare_head(name, hidden, weight, labels, bias, impl="triton", label_smoothing=0.1)


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["hidden_only", "weight_only", "bias_only"])
def test_fused_partial_gradients(requires):
    hidden, weight, bias, labels = _inputs(seed=9)
    fast = run_head("triton", hidden, weight, labels, bias, requires=requires, objective="smile")
    ref = run_head("logits", hidden, weight, labels, bias, requires=requires, objective="smile")
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    for got, want in zip(fast[1], ref[1]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=5e-4, rtol=5e-4)


@pytest.mark.parametrize("exact", [False, True], ids=["accumulated", "exact"])
@pytest.mark.parametrize("name", VARIANTS)
def test_fused_low_precision_criterion(name, exact):
    """bf16 inputs: exact accumulation meets the ml-cross-entropy criterion; the default (the weight's
    gradient accumulated in bf16, the hidden one in fp32) meets it for the hidden gradient and up to a
    few units in the last place for the weight's."""
    dtype = torch.bfloat16
    hidden, weight, bias, labels = _inputs(seed=12)
    low = [t.to(dtype) for t in (hidden, weight, bias)]
    grad_output = 0.25 * random_grad_output((3, 7), 12)

    def run(path, tensors, **extra):
        objective, options = variant(name, labels, weight.shape[0])
        return run_head(path, *tensors[:2], labels, tensors[2], grad_output=grad_output, objective=objective,
                        reduction="none", label_smoothing=0.1, **options, **extra)

    truth, naive = run("logits", [t.float() for t in low]), run("logits", low)
    fast = run("triton", low, exact_accumulation=exact)
    assert fast[0].dtype == torch.float32 and [g.dtype for g in fast[1]] == [dtype] * 3
    assert_low_precision(fast[0], naive[0], truth[0], dtype, "forward", "loss")
    for what, f, n, t in zip(("hidden", "weight", "bias"), fast[1], naive[1], truth[1]):
        relative = 0.0 if exact or what != "weight" else ACCUMULATED
        assert_low_precision(f, n, t, dtype, "backward", f"grad of {what}", relative=relative)


def test_the_hidden_gradient_of_a_summed_loss_is_as_close_as_the_dense_heads_by_default():
    # Each hidden row sums one term per vocabulary tile: accumulated in bf16 (before), a summed loss's
    # large gradients missed the criterion by 0.06 at V=300; it accumulates in fp32, narrowed once.
    g = generator(0)
    hidden = torch.randn(2, 16, 16, generator=g).bfloat16()
    weight = (torch.randn(300, 16, generator=g) * 0.75).bfloat16()
    labels = torch.randint(0, 300, (2, 16), generator=g)

    def grad_of_hidden(path, h, w):
        h = h.detach().requires_grad_(True)
        if path == "logits":
            loss = seqloss.objective_loss(h @ w.T, labels, "mle", shift=True, reduction="sum", impl="reference")
        else:
            loss = seqloss.linear_loss(h, w, labels, objective="mle", shift=True, reduction="sum", impl=path)
        loss.backward()
        return h.grad

    truth = grad_of_hidden("logits", hidden.float(), weight.float())
    naive = grad_of_hidden("logits", hidden, weight)
    fast = grad_of_hidden("triton", hidden, weight)
    assert fast.dtype == torch.bfloat16 and truth.abs().max() > 2
    assert_low_precision(fast, naive, truth, torch.bfloat16, "backward", "grad of hidden")



def test_fused_gradient_filter_skips_negligible_tiles_within_the_criterion(monkeypatch):
    # Each hidden state points at its label's head row: every other probability is far below 2^-12,
    # so low-precision inputs skip most tiles — the result moves, but stays within the criterion.
    from seqloss.kernels.engine import Source
    dtype = torch.bfloat16
    _, weight, _, labels = _inputs(2, 6, 64, 80, seed=13, ignore_fraction=0.0)
    weight = torch.nn.functional.normalize(weight, dim=-1)
    hidden = 16.0 * weight[labels]
    low = [t.to(dtype) for t in (hidden, weight)]
    truth = run_head("logits", *[t.float() for t in low], labels)
    naive = run_head("logits", *low, labels)
    filtered = run_head("triton", *low, labels)
    monkeypatch.setattr(Source, "filter", property(lambda self: 0.0))
    exact = run_head("triton", *low, labels)
    assert not torch.equal(filtered[1][1], exact[1][1]), "no tile was skipped"
    for fast in (filtered, exact):
        assert_low_precision(fast[0], naive[0], truth[0], dtype, "forward", "loss")
        for what, f, n, t in zip(("hidden", "weight"), fast[1], naive[1], truth[1]):
            assert_low_precision(f, n, t, dtype, "backward", f"grad of {what}")


def test_a_kernel_that_does_not_fit_the_gpu_runs_with_the_fallback_tile(monkeypatch):
    """Triton raises OutOfResources at launch, before the kernel runs, where a tile needs more shared
    memory than the GPU has: the engine launches the same kernel with ``Blocks.fallback`` instead."""
    from triton.runtime.errors import OutOfResources

    from seqloss.kernels import engine, support_ce as kern
    from seqloss.kernels.parts import Blocks

    hidden, weight, bias, labels = _inputs(seed=5)
    want = run_head("triton", hidden, weight, labels, bias, objective="mle", label_smoothing=0.1)
    refused = []

    class TooLarge:  # the kernel, refusing its large tile
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["BLOCK_M"] == 32:
                    refused.append(grid)
                    raise OutOfResources(278528, 232448, "shared memory")
                return self.kernel[grid](*args, **kwargs)
            return launch

    small = Blocks(16, 16, 16, splits=2)
    monkeypatch.setattr(engine, "blocks_for", lambda *args, **kwargs: Blocks(32, 16, 16, splits=2, fallback=small))
    monkeypatch.setattr(kern, "_stats_kernel", TooLarge(kern._stats_kernel))
    monkeypatch.setattr(kern, "_grad_kernel", TooLarge(kern._grad_kernel))
    got = run_head("triton", hidden, weight, labels, bias, objective="mle", label_smoothing=0.1)
    assert len(refused) == 2  # the statistics pass and the gradient pass each tried the large tile once
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)
    with pytest.raises(OutOfResources):  # no fallback: the error stands
        engine.fitted(lambda b: TooLarge(None)[0](BLOCK_M=b.m), Blocks(32, 16, 16, splits=1))


@pytest.mark.parametrize("name", ["smile", "mle", "random_subset", "mle+smile"])
def test_a_stale_weight_gradient_buffer_is_written_or_zeroed(monkeypatch, name):
    """Where the weight gradient's buffer comes stale (a GPU's, or a reused CPU map), a first full part
    in one block of slots (SMILE's first tokens) writes every row, zeros where a tile was skipped;
    otherwise the buffer is zeroed: with NaN in every entry, no NaN may be left."""
    from seqloss import _buffers
    from seqloss.kernels import engine

    stores = []
    real = engine.gradients

    def recorded(*args, **kwargs):
        stores.append(kwargs.get("store_w", False))
        return real(*args, **kwargs)

    hidden, weight, bias, labels = _inputs(seed=14)
    want = run_head("logits", hidden, weight, labels, bias, **variant_kwargs(name, labels, weight.shape[0]))
    monkeypatch.setattr(_buffers, "workspace", lambda shape, dtype, device: (torch.full(shape, float("nan"),
                                                                                        dtype=dtype), False))
    monkeypatch.setattr(engine, "gradients", recorded)
    got = run_head("triton", hidden, weight, labels, bias, **variant_kwargs(name, labels, weight.shape[0]))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=5e-4, rtol=5e-4)
    first = {"smile": [True], "mle": [False], "random_subset": [], "mle+smile": [False]}[name]
    assert stores[:1] == first, "the first full part writes the weight gradient only in a single block"


def variant_kwargs(name: str, labels, vocab_size: int) -> dict:
    if name == "mle+smile":
        return dict(objective={"mle": 0.5, "smile": 0.5})
    objective, options = variant(name, labels, vocab_size)
    return dict(objective=objective, **options)


def test_a_written_weight_gradient_equals_an_added_one_where_tiles_are_skipped(monkeypatch):
    """bf16 SMILE whose softmax is peaked (most tiles under the gradient filter): the first tokens'
    part writing a stale (NaN) buffer — zeros for the skipped tiles — gives the very gradient that
    adding into a zeroed buffer gives."""
    from seqloss import _buffers

    _, weight, _, labels = _inputs(2, 6, 64, 80, seed=13, ignore_fraction=0.0)
    weight = torch.nn.functional.normalize(weight, dim=-1)
    low = [t.to(torch.bfloat16) for t in (16.0 * weight[labels], weight)]
    grads = {}
    for fill, fresh in ((float("nan"), False), (0.0, True)):
        monkeypatch.setattr(_buffers, "workspace", lambda shape, dtype, device, fill=fill, fresh=fresh: (
            torch.full(shape, fill, dtype=dtype), fresh))
        grads[fresh] = run_head("triton", *low, labels, objective="smile")[1][1]
    assert not grads[False].isnan().any()
    assert torch.equal(grads[False], grads[True])
