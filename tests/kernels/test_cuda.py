"""Every option of the fast paths on a real GPU, against the dense spec (``impl="reference"``) on the
same GPU: each objective and the mixture, on the logits path and the fused head, Triton kernels and the
torch engine, in fp32, bf16 and fp16, with soft-capping, the z-loss, class weights, token weights,
label smoothing, packed rows (``position_ids``), turns, ``return_stats``, ``num_items_in_batch``,
every reduction, and the fused head's bias and ``exact_accumulation``; ``sampled_softmax_loss`` (torch
engine: it has no kernel) with its samplers likewise. Values and gradients; fp32 within the tolerance
table, bf16/fp16 by the ml-cross-entropy criterion (gradients the Triton head accumulates in bf16/fp16
allowed ``ACCUMULATED`` of their magnitude besides).

The whole product (7 objectives × 2 paths × 3 dtypes × every option) would take far too long, so a
covering design runs instead: for each path and dtype, every objective once, each with one bundle of
options (``BUNDLES``); the bundle an objective gets turns with the path and the dtype, so every option
meets every path and dtype, and each bundle 6 of the 7 objectives (checked by ``test_the_design_covers_...``).

The same test bodies run twice: on CUDA, at shapes big enough for several tiles, splits and programs
per position (``TRITON_INTERPRET=0``; the twin then skips), and on CPU tensors through Triton's
interpreter at tiny shapes (``TRITON_INTERPRET=1``, as ``make test`` runs), so that tests which only
matter on a GPU are known to be sound without one. ``test_cuda_autocast_compile.py`` adds autocast and
``torch.compile`` on top of the same option builders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch

pytest.importorskip("triton")

import seqloss  # noqa: E402
from seqloss import kernels  # noqa: E402
from seqloss.call import LinearOptions  # noqa: E402
from tests.conftest import (  # noqa: E402
    ACCUMULATED,
    MIXTURE,
    OBJECTIVE_NAMES,
    assert_close_fp32,
    assert_low_precision,
    generator,
)

NAMES = OBJECTIVE_NAMES + ("mixture",)
PATHS = ("logits", "fused")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
Tensor = torch.Tensor


@dataclass(frozen=True)
class Setting:
    """Where the bodies run, and at what size."""

    device: torch.device
    logits: tuple[int, int, int]              # B, N, V
    fused: tuple[int, int, int, int]          # B, N, H, V
    sampled: tuple[int, int, int, int, int]   # B, N, H, V, num_negatives
    candidates: int                           # K of subset's include/exclude lists
    random_samples: int                       # random_subset's num_samples


SETTINGS = {
    "cuda": Setting(torch.device("cuda"), (3, 700, 5003), (2, 1000, 256, 32003), (4, 512, 128, 50021, 1024), 200, 64),
    "interpreted": Setting(torch.device("cpu"), (2, 9, 37), (2, 9, 16, 41), (2, 9, 8, 50, 7), 5, 4),
}


def runs_here(name: str) -> bool:
    if name == "cuda":
        return torch.cuda.is_available() and kernels.unavailable_reason(torch.device("cuda")) is None
    return kernels.unavailable_reason(torch.device("cpu")) is None


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.skipif(
    not runs_here(name), reason="cuda: needs a CUDA GPU with Triton compiling (TRITON_INTERPRET=0); "
                                "interpreted: needs TRITON_INTERPRET=1")) for name in SETTINGS])
def setting(request) -> Setting:
    return SETTINGS[request.param]


# --- the options ------------------------------------------------------------------------------------

# One bundle per objective slot: every key below is built into real keywords by ``common_options``.
BUNDLES: tuple[dict[str, Any], ...] = (
    dict(label_smoothing=0.1),
    dict(softcap=20.0, z_loss=1e-3, reduction="sum", bias=True),
    dict(class_weights=True, shift=False, reduction="none", exact_accumulation=True),
    dict(token_weights=True, label_smoothing=0.1, reduction="sequence", bias=True),
    dict(packed=True, softcap=30.0, reduction="sequence"),
    dict(turns=True, z_loss=1e-4, token_weights=True, num_items_in_batch=True, bias=True),
    dict(return_stats=True, softcap=15.0, z_loss=1e-3, packed=True, turns=True, reduction="none"),
)
OPTION_KEYS = ("label_smoothing", "softcap", "z_loss", "class_weights", "token_weights", "packed", "turns",
               "return_stats", "num_items_in_batch", "shift")
FUSED_KEYS = ("bias", "exact_accumulation")  # the fused head's own
# With low-precision inputs the Triton fused head accumulates its gradients in that dtype unless asked
# for exact (fp32) accumulation, where the engine has the option.
HAS_EXACT_ACCUMULATION = "exact_accumulation" in LinearOptions.__optional_keys__
REDUCTION_NAMES = ("mean", "sum", "none", "sequence")


def bundle_id(bundle: dict[str, Any]) -> str:
    return "+".join(k if v is True else f"{k}={v}" for k, v in bundle.items())


def labels_for(B: int, N: int, V: int, seed: int, device: torch.device) -> Tensor:
    """Skewed ids (rows share many of them, as text does), 20% ignored, the last row's tail all ignored."""
    g = generator(seed)
    labels = (torch.rand(B, N, generator=g) ** 3 * V).long().clamp_(0, V - 1)
    labels[torch.rand(B, N, generator=g) < 0.2] = -100
    labels[-1, N - N // 4:] = -100
    return labels.to(device)


def packed_positions(B: int, N: int, seed: int, device: torch.device) -> Tensor:
    """position_ids restarting at 0 where a packed example starts (about 4 examples a row)."""
    g = generator(seed + 1)
    starts = torch.rand(B, N, generator=g) < 4 / N
    starts[:, 0] = True
    index = torch.arange(N).expand(B, N)
    return (index - torch.where(starts, index, 0).cummax(-1).values).to(device)


def member_options(name: str, labels: Tensor, V: int, setting: Setting, variant: int) -> tuple[Any, dict[str, Any]]:
    """Objective and its own options, afresh per call (a generator is consumed by a call); ``variant``
    turns SMILE's first-token rule and subset's kind of candidate list."""
    lead, device, K = tuple(labels.shape[:-1]), labels.device, setting.candidates
    if name == "mixture":
        return MIXTURE, dict(exclude_ids=(1,)) if variant % 2 else {}
    if name == "smile":
        return name, dict(exclude_ids=(1,), first_token_mle=variant % 2 == 0)
    if name == "random_subset":
        return name, dict(num_samples=setting.random_samples, generator=generator(0), exclude_ids=(0,))
    if name == "reverse_subset":
        return name, dict(exclude_ids=(0,))
    if name == "selective_eos":
        return name, dict(eos_token_id=2)
    if name == "subset":
        g = generator(3)
        kind = ("include", "include_per_position", "exclude")[variant % 3]
        if kind == "exclude":
            return name, dict(exclude=torch.randint(-1, V, (*lead, K), generator=g).to(device))
        shape = (*lead, K) if kind == "include" else (*labels.shape, max(K // 4, 2))
        return name, dict(include=torch.randint(-1, V, shape, generator=g).to(device))
    return name, {}


def common_options(bundle: dict[str, Any], labels: Tensor, V: int, path: str, seed: int) -> dict[str, Any]:
    """The bundle as keywords of ``objective_loss`` (path "logits"), ``linear_loss`` ("fused") or
    ``sampled_softmax_loss`` ("sampled")."""
    B, N = labels.shape
    device = labels.device
    out: dict[str, Any] = dict(shift=bundle.get("shift", True), reduction=bundle.get("reduction", "mean"))
    for key in ("label_smoothing", "softcap", "z_loss", "turns", "return_stats"):
        if key in bundle:
            out[key] = bundle[key]
    if path == "fused" and bundle.get("exact_accumulation") and HAS_EXACT_ACCUMULATION:
        out["exact_accumulation"] = True
    if bundle.get("class_weights"):
        weights = (torch.rand(V, generator=generator(seed + 2)) * 2).to(device)
        out["weight" if path == "logits" else "class_weight"] = weights
    if bundle.get("token_weights"):
        out["token_weights"] = (torch.rand(B, N, generator=generator(seed + 3)) * 2).to(device)
    if bundle.get("packed"):
        out["position_ids"] = packed_positions(B, N, seed, device)
    if bundle.get("num_items_in_batch"):
        out["num_items_in_batch"] = int((labels != -100).sum()) + 7
    return out


def _cases():
    for p, path in enumerate(PATHS):
        for d, dtype in enumerate(DTYPES):
            for k, bundle in enumerate(BUNDLES):
                name = NAMES[(k + p + 2 * d) % len(NAMES)]
                yield pytest.param(path, dtype, name, k, id=f"{path}-{DTYPE_IDS[dtype]}-{name}-{bundle_id(bundle)}")


CASES = list(_cases())


def test_the_design_covers_every_option_with_each_path_and_dtype():
    met = {(c.values[0], c.values[1], key) for c in CASES for key in BUNDLES[c.values[3]]}
    met |= {(c.values[0], c.values[1], BUNDLES[c.values[3]].get("reduction", "mean")) for c in CASES}
    objectives = {(c.values[0], c.values[1], c.values[2]) for c in CASES}
    for path in PATHS:
        for dtype in DTYPES:
            wanted = set(OPTION_KEYS) | set(REDUCTION_NAMES) | set(FUSED_KEYS if path == "fused" else ())
            assert {key for p, d, key in met if (p, d) == (path, dtype)} >= wanted
            assert {name for p, d, name in objectives if (p, d) == (path, dtype)} == set(NAMES)


# --- running and comparing ------------------------------------------------------------------------


@dataclass
class Run:
    out: Any                  # the loss, or LossStats
    loss: Tensor              # fp32, detached
    grads: list[Tensor]


def run(fn, tensors: list[Optional[Tensor]], labels: Tensor, grad_seed: int, **kwargs: Any) -> Run:
    """``fn(*leaves, labels, **kwargs)`` on fresh leaves (None stays None), then backward with a
    seeded random grad_output of the loss's shape. Unless the reduction is a mean, grad_output is
    divided by the number of supervised labels, so that gradients keep a mean's scale, the one the
    low-precision criterion's absolute slack is made for; so is a summed loss (``sum``, ``sequence``)
    in ``Run.loss``: its rounding errors add up over the terms, as a mean's average out."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves, labels, **kwargs)
    loss = out.loss if kwargs.get("return_stats") else out
    reduction = kwargs.get("reduction", "mean")
    scale = 1.0 if reduction == "mean" else 1.0 / max(int((labels != -100).sum()), 1)
    grad_output = torch.randn(loss.shape, generator=generator(grad_seed)) * scale
    loss.backward(grad_output.to(loss.device))
    summed = scale if reduction in ("sum", "sequence") else 1.0
    return Run(out, loss.detach().float() * summed, [t.grad for t in leaves if t is not None])


def compare(fast: Run, naive: Run, truth: Run, dtype: torch.dtype, fused: bool, where: str,
            accumulated: bool = False) -> None:
    """``fast`` against the spec: fp32 within the table (looser for a fused head), low precision by the
    criterion, plus a few units in the last place of each gradient when it was ``accumulated`` in the
    low-precision dtype."""
    assert fast.loss.shape == truth.loss.shape, where
    if dtype == torch.float32:
        if fused:  # the kernels and F.linear sum the dots in different orders
            torch.testing.assert_close(fast.loss, truth.loss, atol=1e-4, rtol=1e-4, msg=lambda m: f"{where}: {m}")
            for got, want in zip(fast.grads, truth.grads):
                torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=lambda m: f"{where}: {m}")
        else:
            assert_close_fp32(fast.loss, truth.loss)
            for got, want in zip(fast.grads, truth.grads):
                assert_close_fp32(got, want, "backward")
        return
    assert_low_precision(fast.loss, naive.loss, truth.loss, dtype, what=f"{where} loss")
    for i, (got, naive_grad, want) in enumerate(zip(fast.grads, naive.grads, truth.grads)):
        assert_low_precision(got, naive_grad, want, dtype, "backward", what=f"{where} grad {i}",
                             relative=ACCUMULATED if accumulated else 0.0)


def compare_stats(fast: Any, exact: Any, truth: Any, naive: Any, dtype: torch.dtype, where: str,
                  scores: Tensor) -> None:
    """z-loss like the loss; predicted ids against the spec on the same (rounded) inputs in fp32,
    whose logits are ``scores`` (B, N, V): where they differ, the two ids are a near-tie — their
    logits within what the compute dtype resolves (2^-7 of their size: an engine may compare logits
    rounded to bf16/fp16), and nine positions in ten agree."""
    if dtype == torch.float32:
        torch.testing.assert_close(fast.z_loss.float(), truth.z_loss.float(), atol=1e-4, rtol=1e-4)
    else:
        assert_low_precision(fast.z_loss, naive.z_loss, truth.z_loss, dtype, what=f"{where} z-loss")
    got, want = fast.predicted_ids, exact.predicted_ids
    assert torch.equal(got < 0, want < 0), f"{where}: predicted ids where the spec has none, or none where it has"
    differ = got != want
    agree = 1.0 - differ.float().mean()
    assert agree >= 0.9, f"{where}: predicted ids agree at {agree:.3f} of positions"
    if differ.any():
        top = scores[differ].gather(-1, want[differ].unsqueeze(-1)).squeeze(-1)
        picked = scores[differ].gather(-1, got[differ].unsqueeze(-1)).squeeze(-1)
        gap = (top - picked) - 2.0 ** -7 * top.abs()
        assert gap.max() <= 1e-6, f"{where}: a predicted id's logit is {float(gap.max()):.3g} below the tie margin"
    accuracy_gap = abs(float(fast.token_accuracy) - float(exact.token_accuracy))
    assert accuracy_gap <= float(differ.float().mean()) + 1e-6, where


@pytest.mark.parametrize("path, dtype, name, bundle_index", CASES)
def test_every_option_against_the_spec(setting, path, dtype, name, bundle_index):
    bundle = BUNDLES[bundle_index]
    seed = bundle_index + 10 * DTYPES.index(dtype)
    g = generator(seed)
    if path == "logits":
        B, N, V = setting.logits
        tensors: list[Optional[Tensor]] = [(torch.randn(B, N, V, generator=g) * 3).to(setting.device)]
        fn: Any = seqloss.objective_loss
    else:
        B, N, H, V = setting.fused
        hidden = torch.randn(B, N, H, generator=g)
        weight, bias = torch.randn(V, H, generator=g) * H ** -0.5, torch.randn(V, generator=g) * 0.1
        tensors = [hidden.to(setting.device), weight.to(setting.device),
                   bias.to(setting.device) if bundle.get("bias") else None]
        fn = seqloss.linear_loss
    labels = labels_for(B, N, V, seed, setting.device)

    def call(impl: str, inputs: list[Optional[Tensor]]) -> Run:
        objective, member = member_options(name, labels, V, setting, DTYPES.index(dtype))
        options = common_options(bundle, labels, V, path, seed)
        if path == "logits":
            return run(fn, inputs, labels, seed, objective=objective, impl=impl, **options, **member)
        return run(lambda h, w, b, y, **kw: fn(h, w, y, bias=b, **kw), inputs, labels, seed,
                   objective=objective, impl=impl, **options, **member)

    def cast(to: torch.dtype) -> list[Optional[Tensor]]:
        return [None if t is None else t.to(to) for t in tensors]

    truth = call("reference", tensors)
    naive = truth if dtype == torch.float32 else call("reference", cast(dtype))
    rounded = [None if t is None else t.to(dtype).float() for t in tensors]
    exact = truth if dtype == torch.float32 else call("reference", rounded)
    scores = rounded[0] if path == "logits" else torch.nn.functional.linear(*rounded)
    for impl in ("triton", "torch"):
        fast = call(impl, cast(dtype))
        where = f"{impl} {path} {DTYPE_IDS[dtype]} {name} {bundle_id(bundle)}"
        assert all(grad.dtype == dtype for grad in fast.grads), where
        accumulated = path == "fused" and impl == "triton" and not common_options(
            bundle, labels, V, path, seed).get("exact_accumulation", False)
        compare(fast, naive, truth, dtype, path == "fused", where, accumulated)
        if bundle.get("return_stats"):
            compare_stats(fast.out, exact.out, truth.out, naive.out, dtype, where, scores)


# --- sampled softmax ---------------------------------------------------------------------------------

SAMPLERS = ("uniform", "log_uniform", "in_batch", "weights")
SAMPLED_BUNDLES: tuple[dict[str, Any], ...] = (
    dict(label_smoothing=0.1),
    dict(reduction="sum", shift=False),
    dict(token_weights=True, packed=True, reduction="none"),
    dict(num_items_in_batch=True, packed=True, reduction="sequence"),
)
SAMPLED_CASES = [pytest.param(dtype, sampler, (s + d) % len(SAMPLED_BUNDLES),
                              id=f"{DTYPE_IDS[dtype]}-{sampler}-{bundle_id(SAMPLED_BUNDLES[(s + d) % 4])}")
                 for d, dtype in enumerate(DTYPES) for s, sampler in enumerate(SAMPLERS)]


@pytest.mark.parametrize("dtype, sampler, bundle_index", SAMPLED_CASES)
def test_sampled_softmax_against_the_spec(setting, dtype, sampler, bundle_index):
    B, N, H, V, K = setting.sampled
    seed = 50 + bundle_index + 10 * DTYPES.index(dtype)
    g = generator(seed)
    hidden, weight = torch.randn(B, N, H, generator=g), torch.randn(V, H, generator=g) * H ** -0.5
    tensors = [hidden.to(setting.device), weight.to(setting.device)]
    labels = labels_for(B, N, V, seed, setting.device)
    turn = SAMPLERS.index(sampler) + DTYPES.index(dtype)
    draws: Any = sampler
    if sampler == "weights":
        draws = torch.rand(V, generator=generator(seed + 4)).to(setting.device)
        draws[::3] = 0.0

    def call(impl: str, inputs: list[Tensor]) -> Run:
        options = common_options(SAMPLED_BUNDLES[bundle_index], labels, V, "sampled", seed)
        return run(seqloss.sampled_softmax_loss, inputs, labels, seed, num_negatives=K, sampler=draws,
                   share_negatives=turn % 2 == 0, log_q_correction=turn % 3 != 2, remove_accidental_hits=turn % 2 == 1,
                   generator=generator(seed + 5), impl=impl, **options)

    truth = call("reference", tensors)
    naive = truth if dtype == torch.float32 else call("reference", [t.to(dtype) for t in tensors])
    fast = call("torch", [t.to(dtype) for t in tensors])
    assert all(grad.dtype == dtype for grad in fast.grads)
    where = f"sampled {DTYPE_IDS[dtype]} {sampler}"
    if dtype == torch.float32:
        assert_close_fp32(fast.loss, truth.loss)
        for got, want in zip(fast.grads, truth.grads):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=lambda m: f"{where}: {m}")
    else:
        compare(fast, naive, truth, dtype, True, where)
    with pytest.raises(ValueError, match="no Triton kernel"):
        call("triton", tensors)
