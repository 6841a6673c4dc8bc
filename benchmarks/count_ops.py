"""What one fused-head step asks of the host: tensor operations, synchronisations, kernel launches.

On a GPU each tensor operation costs the host a few to tens of microseconds to issue whatever its
size, and each synchronisation makes the host wait for the device to drain: a step whose device
time is short (SMILE's, a few ms on an H200) is as slow as its host. This counts, for one forward
and backward of ``linear_loss`` (the Triton engine through Triton's interpreter on CPU tensors, so
that it runs anywhere; the torch engine alongside):

* tensor operations — every ATen call that is not a view (``TorchDispatchMode``), forward and
  backward, where it comes from (``--where``);
* synchronisations — calls that read device data on the host (``item``/``int``/``bool``,
  ``nonzero``, boolean indexing);
* Triton launches, and Python calls into seqloss's own functions.

The counts are the CPU path's: on a GPU, lists are padded to a multiple of 8 (one more operation
where K is not), buffers are plain ``torch.empty`` (the CPU's mapped workspaces take three calls),
and bf16 inputs take their label logits in one product instead of two operations.

    python benchmarks/count_ops.py [--shape 2,64,32,512] [--where]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import seqloss  # noqa: E402
from common import zipf_labels  # noqa: E402

VIEWS = {"view", "as_strided", "_unsafe_view", "t", "transpose", "select", "slice", "unsqueeze", "squeeze", "expand",
         "alias", "detach", "permute", "reshape", "unbind", "split", "lift_fresh", "diagonal", "_reshape_alias"}
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}
CASES = [("mle", "triton"), ("smile", "triton"), ("mle+smile", "triton"), ("smile, packed", "triton"),
         ("mle", "torch"), ("smile", "torch")]


class Counter(TorchDispatchMode):
    """Counts tensor operations (outside Triton's interpreter, whose own copies a GPU does not make)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        stack = traceback.extract_stack()[:-1]
        if not any("triton" + os.sep + "runtime" in frame.filename for frame in stack):
            name = func._schema.name.split("::")[-1]
            if name not in VIEWS:
                where = next((f"{frame.filename.split('seqloss' + os.sep)[-1]}:{frame.name}" for frame in
                              reversed(stack) if os.sep + "seqloss" + os.sep in frame.filename), "autograd")
                self.ops.append((name, where))
        return func(*args, **(kwargs or {}))


def launches_counted() -> list[int]:
    """A one-item list counting Triton launches from now on (the interpreter's grid executor)."""
    from triton.runtime import interpreter
    count = [0]
    call = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        count[0] += 1
        return call(self, *args, **kwargs)
    interpreter.GridExecutor.__call__ = counted
    return count


def step_inputs(case: str, shape: tuple[int, int, int, int]):
    B, N, H, V = shape
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * H ** -0.5
    labels = zipf_labels((B, N), V, pad_fraction=0.0)
    objective = {"mle": 0.5, "smile": 0.5} if case == "mle+smile" else case.split(",")[0]
    extra = {}
    if case.endswith("packed"):  # four examples per row
        extra["position_ids"] = torch.arange(N).remainder(max(1, N // 4)).expand(B, N)
    return hidden, weight, labels, dict(objective=objective, **extra)


def count(case: str, impl: str, shape: tuple[int, int, int, int], launches: list[int]) -> dict:
    hidden, weight, labels, options = step_inputs(case, shape)

    def step(counter=None):
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)  # fresh leaves
        loss = seqloss.linear_loss(h, w, labels, impl=impl, **options)
        forward = len(counter.ops) if counter is not None else 0
        loss.backward()
        return forward

    for _ in range(2):  # warm caches (kernel compilation, workspaces)
        step()
    calls = [0]

    def profile(frame, event, arg):
        if event == "call" and os.sep + "seqloss" + os.sep in frame.f_code.co_filename:
            caller = frame.f_back
            while caller is not None:  # not the kernels' own code, which the interpreter runs as Python
                if "triton" + os.sep + "runtime" in caller.f_code.co_filename:
                    return
                caller = caller.f_back
            calls[0] += 1
    before = launches[0]
    counter = Counter()
    sys.setprofile(profile)
    try:
        with counter:
            forward = step(counter)
    finally:
        sys.setprofile(None)
    ops = counter.ops
    return dict(forward=forward, backward=len(ops) - forward, syncs=sum(name in SYNCS for name, _ in ops),
                launches=launches[0] - before, calls=calls[0], ops=ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="2,64,32,512", help="B,N,H,V")
    parser.add_argument("--where", action="store_true", help="list each case's operations by where they come from")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    assert len(shape) == 4, "--shape is B,N,H,V"
    launches = launches_counted()
    print(f"## Host work of one fused-head step (forward + backward), B,N,H,V = {args.shape}, torch {torch.__version__}")
    print("| objective | impl | tensor ops forward | backward | synchronisations | Triton launches | seqloss Python calls |")
    print("|---|---|---|---|---|---|---|")
    found = {}
    for case, impl in CASES:
        found[case, impl] = c = count(case, impl, shape, launches)  # type: ignore[arg-type]
        print(f"| {case} | {impl} | {c['forward']} | {c['backward']} | {c['syncs']} | {c['launches']} | {c['calls']} |")
    if args.where:
        for (case, impl), c in found.items():
            print(f"\n### {case} / {impl}")
            for where, n in collections.Counter(w for _, w in c["ops"]).most_common():
                names = sorted({name for name, w in c["ops"] if w == where})
                print(f"{n:4d}  {where}  ({', '.join(names)})")


if __name__ == "__main__":
    main()
