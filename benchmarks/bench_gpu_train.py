"""One training step of a ~1B Llama on a GPU, with each loss provider patched into the same model.

Model: ``transformers.LlamaForCausalLM`` from a ``LlamaConfig`` (random weights, no download) of
Llama-3.2-1B's shape: 16 layers, H=2048, SwiGLU 8192 wide, 32 heads (8 key/value heads), V=128256,
tied embeddings, SDPA attention; bf16 weights. Batch: B=4 rows of N=2048 Zipf-distributed token ids,
labels = inputs (every position supervised). AdamW (torch's, ``fused=True`` on CUDA), lr 1e-5.
Gradient checkpointing is off (``--checkpointing`` turns it on): at this shape a step's activations
are an estimated 15-20 GiB (and full logits ~10 GiB more for ``hf``), with five copies' weights and
AdamW state ~40 GiB: far below an H200's 139 GiB. Recomputing the body would add the same forward to
every provider and hide the loss's share of the step.

Providers, each on its own deep copy of the same initial model, with its own AdamW:

* ``hf`` — the model's own loss: full logits, then ``ForCausalLMLoss`` on them (upcast to fp32);
* ``liger`` — ``apply_liger_kernel_to_llama(fused_linear_cross_entropy=True, model=...)`` with its
  RoPE, RMSNorm and SwiGLU patches off, so that only the loss differs (patched on the instance);
* ``cut cross-entropy`` — ``cut_cross_entropy.transformers.cce_patch`` where the installed version
  has it; the PyPI release does not, so otherwise its ``linear_cross_entropy`` on the body's last
  hidden states and the head's weight (shift=True), which is what that patch installs;
* ``seqloss mle fused`` / ``seqloss smile fused`` — ``seqloss.hf.patch(model, objective,
  fused=True, impl=...)`` (``impl="triton"`` on CUDA; ``"torch"`` on CPU, ``"triton"`` there under
  ``TRITON_INTERPRET=1``).

A step is ``zero_grad(set_to_none=True)`` → forward with labels → backward → ``AdamW.step()``. Time:
median of ``--repeats`` rounds after ``--warmup`` steps, providers interleaved in each round (A B A B
...), CUDA events (the wall clock on CPU). Peak GiB: the allocator's high-water mark during a timed
step (``reset_peak_memory_stats`` before it), counting this provider's own weights and AdamW state
and none of the other providers' copies; the largest over the rounds. First-step loss: each
provider's loss at its first step, on the same weights and batch; the MLE providers must agree
within the dtype's tolerance, else a warning row says by how much. Peers that are not installed, or
that fail at their first step, are listed with the reason.

    python benchmarks/bench_gpu_train.py [--shape llama-1b] [--repeats 5] [--markdown FILE]
    python benchmarks/bench_gpu_train.py --shape tiny --device cpu --repeats 1   # the script's own test
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import seqloss
import seqloss.hf
from common import publish, zipf_labels
from seqloss import kernels

SHAPES: dict[str, dict[str, Any]] = {
    "llama-1b": dict(layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, seq=2048,
                     batch=4),
    "tiny": dict(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, vocab=256, seq=16, batch=2),
}
# Relative tolerance of the MLE providers' first-step losses, by the weights' dtype.
AGREEMENT = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-4}

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, labels) -> scalar loss


@dataclass
class Provider:
    name: str
    objective: str                                    # "mle" or "smile"
    peer: bool                                        # an MLE peer: the speed ratio's reference
    prepare: Callable[[torch.nn.Module, str], Loss]   # (its model copy, seqloss impl) -> loss of a batch
    missing: Optional[str] = None                     # why it cannot run here


def _model_loss(model: torch.nn.Module) -> Loss:
    return lambda ids, labels: model(input_ids=ids, labels=labels).loss


def hf_prepare(model: torch.nn.Module, impl: str) -> Loss:
    return _model_loss(model)


def liger_prepare(model: torch.nn.Module, impl: str) -> Loss:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=False, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=False,
                                swiglu=False, model=model)
    return _model_loss(model)


def cce_prepare(model: torch.nn.Module, impl: str) -> Loss:
    try:
        from cut_cross_entropy.transformers import cce_patch
    except ImportError:
        cce_patch = None
    if cce_patch is not None:
        patched = cce_patch(model)  # given an instance, it patches that instance
        return _model_loss(model if patched is None else patched)
    from cut_cross_entropy import linear_cross_entropy

    def loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = model.model(input_ids=ids).last_hidden_state
        return linear_cross_entropy(hidden, model.get_output_embeddings().weight, labels, shift=True)

    return loss


def seqloss_prepare(objective: str) -> Callable[[torch.nn.Module, str], Loss]:
    def prepare(model: torch.nn.Module, impl: str) -> Loss:
        seqloss.hf.patch(model, objective, fused=True, impl=impl)
        return _model_loss(model)
    return prepare


def _missing(module: str) -> Optional[str]:
    try:
        __import__(module)
    except ImportError:
        return "not installed"
    return None


def providers() -> list[Provider]:
    return [Provider("hf", "mle", True, hf_prepare),
            Provider("liger", "mle", True, liger_prepare, _missing("liger_kernel.transformers")),
            Provider("cut cross-entropy", "mle", True, cce_prepare, _missing("cut_cross_entropy")),
            Provider("seqloss mle fused", "mle", False, seqloss_prepare("mle")),
            Provider("seqloss smile fused", "smile", False, seqloss_prepare("smile"))]


def build_model(shape: dict[str, Any], device: torch.device, dtype: torch.dtype,
                checkpointing: bool) -> torch.nn.Module:
    import transformers  # the hf extra; imported here so that --help needs none

    config = transformers.LlamaConfig(
        num_hidden_layers=shape["layers"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        max_position_embeddings=max(shape["seq"], 128), tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it trains: no host copy of a 1B model
        model = transformers.LlamaForCausalLM(config)
    model = model.to(dtype).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


class Clock:
    """A step's milliseconds (CUDA events on a GPU, the wall clock elsewhere) and allocator peak."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, step: Callable[[], Any]) -> tuple[float, Optional[int]]:
        if not self.cuda:
            start = time.perf_counter()
            step()
            return (time.perf_counter() - start) * 1e3, None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end), torch.cuda.max_memory_allocated() - before


class Trainer:
    """One provider: its model copy, its AdamW, its losses."""

    def __init__(self, model: torch.nn.Module, loss: Loss, ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.model, self.loss, self.ids, self.labels = model, loss, ids, labels
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=ids.device.type == "cuda")
        self.losses: list[float] = []

    def step(self) -> None:
        loss = self.loss(self.ids, self.labels)
        loss.backward()
        self.optimizer.step()
        # Gradients freed at the end rather than the start of the step: between its steps a provider
        # holds only its weights and moments, so another provider's step never counts its gradients.
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))

    def state_bytes(self) -> int:
        """Its weights and AdamW moments, all it holds between steps."""
        tensors = list(self.model.parameters())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def _reason(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"


def measure(providers_run: list[Provider], base: torch.nn.Module, ids: torch.Tensor, impl: str, repeats: int,
            warmup: int) -> tuple[dict[str, Trainer], dict[str, list[float]], dict[str, int], dict[str, str]]:
    """Each provider's trainer (after its warm-up steps), step times and peak bytes; and why the
    others did not run. ``base`` is copied for each provider and left as it was."""
    clock = Clock(ids.device)
    skipped = {p.name: "skipped: " + p.missing for p in providers_run if p.missing}
    trainers: dict[str, Trainer] = {}
    for p in providers_run:
        if p.name in skipped:
            continue
        model = copy.deepcopy(base)
        try:
            trainer = Trainer(model, p.prepare(model, impl), ids, ids.clone())
            for _ in range(warmup):  # the first gives the first-step loss; compiling and autotuning happen here
                trainer.step()
            trainers[p.name] = trainer
        except Exception as error:  # a peer that cannot run this model is a row, not the end of the table
            skipped[p.name] = _reason(error)
            model = trainer = None
            gc.collect()
            if clock.cuda:
                torch.cuda.empty_cache()
    times: dict[str, list[float]] = {name: [] for name in trainers}
    peaks: dict[str, int] = {name: 0 for name in trainers}
    for _ in range(repeats):  # interleaved (A B A B ...), as a training loop interleaves its work
        for name, trainer in trainers.items():
            ms, peak = clock.time(trainer.step)
            times[name].append(ms)
            if peak is not None:
                peaks[name] = max(peaks[name], peak + trainer.state_bytes())
    return trainers, times, peaks, skipped


def run(shape_name: str, device: torch.device, repeats: int, warmup: int, only: list[str],
        checkpointing: bool) -> tuple[list[dict], list[str]]:
    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    impl = "triton" if kernels.unavailable_reason(device) is None else "torch"
    ids = zipf_labels((shape["batch"], shape["seq"]), shape["vocab"], pad_fraction=0.0).to(device)
    base = build_model(shape, device, dtype, checkpointing)
    params = sum(t.numel() for t in base.parameters())  # tied embeddings counted once
    chosen = [p for p in providers() if not only or any(p.name.startswith(o) for o in only)]
    trainers, times, peaks, skipped = measure(chosen, base, ids, impl, repeats, warmup)
    del base
    medians = {name: statistics.median(values) for name, values in times.items()}
    fastest = min((medians[p.name] for p in chosen if p.peer and p.name in medians), default=None)
    rows = []
    for p in chosen:
        row = {"shape": shape_name, "provider": p.name, "objective": p.objective, "step ms": skipped.get(p.name, ""),
               "vs fastest MLE peer": "", "peak GiB": "", "first-step loss": ""}
        if p.name in trainers:
            ms = medians[p.name]
            row.update({"step ms": f"{ms:.1f}", "vs fastest MLE peer": f"{fastest / ms:.2f}x" if fastest else "",
                        "peak GiB": f"{peaks[p.name] / 2 ** 30:.2f}" if device.type == "cuda" else "",
                        "first-step loss": f"{trainers[p.name].losses[0]:.5f}"})
        rows.append(row)
    rows += agreement_rows(shape_name, {p.name: trainers[p.name].losses[0] for p in chosen
                                        if p.objective == "mle" and p.name in trainers}, AGREEMENT[dtype])
    notes = [f"{shape_name}: {params:,} parameters, B={shape['batch']}, N={shape['seq']}, V={shape['vocab']}, "
             f"{str(dtype).replace('torch.', '')} weights, seqloss impl={impl!r}, gradient checkpointing "
             f"{'on' if checkpointing else 'off'}"]
    return rows, notes


def agreement_rows(shape: str, first: dict[str, float], tolerance: float) -> list[dict]:
    """A warning row when the MLE providers' first-step losses differ by more than ``tolerance``
    (relative to the first of them); nothing when they agree."""
    if len(first) < 2:
        return []
    reference_name, reference = next(iter(first.items()))
    off = {name: loss for name, loss in first.items() if abs(loss - reference) > tolerance * abs(reference)}
    if not off:
        return []
    what = ", ".join(f"{name} {loss:.5f}" for name, loss in off.items())
    message = f"WARNING: MLE first-step losses differ from {reference_name}'s {reference:.5f} by > {tolerance:g} (rel): {what}"
    print(message, file=sys.stderr)
    return [{"shape": shape, "provider": "warning", "objective": "mle", "step ms": message, "vs fastest MLE peer": "",
             "peak GiB": "", "first-step loss": ""}]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-1b", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default: 2 on CUDA, else 1)")
    parser.add_argument("--only", default="", help="comma-separated provider-name prefixes to run")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on (every provider)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
    if warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1 (the first step's loss is compared)")
    rows, notes = [], []
    for shape in args.shape.split(","):
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}: choose from {sorted(SHAPES)}")
        shape_rows, shape_notes = run(shape, device, args.repeats, warmup, [o for o in args.only.split(",") if o],
                                      args.checkpointing)
        rows += shape_rows
        notes += shape_notes
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    publish(f"Device: {name}, torch {torch.__version__}, transformers {transformers.__version__}; one AdamW step "
            f"(forward, backward, update), median of {args.repeats} interleaved rounds after {warmup} warm-up "
            f"step(s); peak GiB = allocator peak of a step with this provider's own weights and AdamW state. "
            + "; ".join(notes) + ".", rows, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
