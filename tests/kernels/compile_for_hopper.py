"""Compile every kernel variant the engines launch, for an H100 (sm_90), with Triton's bundled ptxas.

Run as a script, in a process without TRITON_INTERPRET (the test sets that up): no GPU is needed,
and it catches what the interpreter does not check — compiled-mode typing, constexpr rules, shapes
that tensor-core dots accept. Prints one line per compiled variant.
"""
from __future__ import annotations

import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from seqloss.kernels import support_ce as kern
from seqloss.kernels.candidates import _candidate_kernel
from seqloss.kernels.finish import _finish_kernel
from seqloss.kernels.parts import fused_tiles

assert os.environ.get("TRITON_INTERPRET") != "1", "compiling needs Triton without its interpreter"

POINTERS = dict(rows_ptr="*i64", labels_ptr="*i64", brows_ptr="*i64", cols_ptr="*i64", bitmap_ptr="*i8",
                max_ptr="*fp32", sum_ptr="*fp32", zsum_ptr="*fp32", size_ptr="*fp32", zy_ptr="*fp32",
                coef_ptr="*fp32", lse_ptr="*fp32", gw_ptr="*fp32", gb_ptr="*fp32", pscale_ptr="*fp32", eps="fp32",
                cap="fp32", best_ptr="*fp32", arg_ptr="*i32")


def compile_variant(fn, dtype: str, fused: bool, constants: dict, accumulate: str = "fp32", launch: tuple = ()) -> None:
    """``accumulate``: the fused head's hidden and weight gradient buffers' dtype (its default with
    bf16 inputs is bf16: sm_90's bf16 atomics; fp32 with exact accumulation); ``launch``: (warps,
    stages) where the engine sets them."""
    types = dict(POINTERS, x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}",
                 gx_ptr=f"*{accumulate}" if fused else f"*{dtype}", gw_ptr=f"*{accumulate}")
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    options = {} if not launch or launch[0] is None else dict(num_warps=launch[0], num_stages=launch[1])
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    assert compiled.asm["cubin"], fn.__name__
    print("ok", fn.__name__, dtype, accumulate, {k: v for k, v in constants.items() if isinstance(v, bool) and v},
          {k: v for k, v in constants.items() if k.startswith("BLOCK")}, options)


def compile_candidates(gradient: str, listed: bool) -> None:
    """The list parts' candidate softmax, its list gradient in ``gradient`` (the products' dtype, or
    fp32 with a bias), every option on; ``listed``: the labels' logits read from their columns."""
    types = dict(zl_ptr="*fp32", zy_ptr="*fp32", ids_ptr="*i64", y_ptr="*i64", on_ptr="*u8", b_ptr="*bf16",
                 w_ptr="*fp32", index_ptr="*i64", loss_ptr="*fp32", zpart_ptr="*fp32", gl_ptr=f"*{gradient}",
                 gy_ptr="*fp32", alpha="fp32", eps="fp32", zeta="fp32", cap="fp32")
    _compile_plain(_candidate_kernel, types, dict(HAS_BIAS=True, SOFTCAP=True, GRAD=True, FOLD=True, ZPART=True,
                                                  LISTED=listed, BLOCK_K=2048), f"{gradient} listed={listed}")


def compile_finish(weights: bool) -> None:
    """A full part's finishing kernel, every option on, with and without the gradient pass's values."""
    types = dict(split_ptr="*fp32", zy_ptr="*fp32", rows_ptr="*i64", on_ptr="*u8", w_ptr="*fp32", loss_ptr="*fp32",
                 zpart_ptr="*fp32", lse_ptr="*fp32", size_ptr="*fp32", coef_ptr="*fp32", pscale_ptr="*fp32",
                 alpha="fp32", eps="fp32", zeta="fp32")
    _compile_plain(_finish_kernel, types, dict(SMOOTH=True, ZLOSS=True, ZPART=True, WEIGHTS=weights, BLOCK=1024),
                   f"weights={weights}")


def _compile_plain(fn, types: dict, constants: dict, label: str) -> None:
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(n),): v for n, v in constants.items()})
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
    print("ok", fn.__name__, label)


def main() -> None:
    dtype = "bf16"
    # The fused head's list parts are grouped matrix products (grouped.py), not kernels.
    # The fused head's tiles on Hopper: the large one for parts of many slots, the small one for few.
    variants = [(True, False, slots) for slots in (8192, 16)] + [(False, True, 0), (False, False, 0)]
    for fused, listed, slots in variants:
        m, c, h, *launch = fused_tiles(slots, (9, 0)) if fused else (4, 2048, 64, None, None)
        blocks = dict(BLOCK_M=m, BLOCK_C=c, BLOCK_H=h)
        common = dict(LIST=listed, EXCLUDE=not listed, FUSED=fused, HAS_BIAS=True, SOFTCAP=listed or fused, UPCAST=False,
                      PRECISION="tf32", **blocks)
        compile_variant(kern._stats_kernel, dtype, fused, dict(common, ARGMAX=not listed), launch=tuple(launch))
        for accumulate in ("bf16", "fp32") if fused else ("fp32",):
            compile_variant(kern._grad_kernel, dtype, fused,
                            dict(common, STORE=not listed, GRAD_X=True, GRAD_W=fused, GRAD_B=fused,
                                 FILTER=2.0 ** -12 if fused else 0.0, RMW=False), accumulate, tuple(launch))
    for fused, accumulate in ((True, "bf16"), (True, "fp32"), (False, "fp32")):
        compile_variant(kern._label_grad_kernel, dtype, fused,
                        dict(FUSED=fused, SOFTCAP=True, GRAD_X=True, GRAD_W=fused, GRAD_B=fused, RMW=False,
                             BLOCK_M=64 if fused else 4, BLOCK_H=64), accumulate)
    # fp32 inputs take IEEE-precision dots.
    compile_variant(kern._grad_kernel, "fp32", True,
                    dict(LIST=False, EXCLUDE=False, FUSED=True, HAS_BIAS=False, SOFTCAP=False, UPCAST=False,
                         PRECISION="ieee", STORE=False, GRAD_X=True, GRAD_W=True, GRAD_B=False, FILTER=0.0,
                         RMW=False, BLOCK_M=16, BLOCK_C=128, BLOCK_H=64))
    # return_stats on a full part without exclusions (MLE): the statistics pass with its argmax.
    compile_variant(kern._stats_kernel, dtype, True,
                    dict(LIST=False, EXCLUDE=False, FUSED=True, HAS_BIAS=False, SOFTCAP=False, UPCAST=False,
                         PRECISION="tf32", ARGMAX=True, BLOCK_M=64, BLOCK_C=128, BLOCK_H=64))
    # SMILE's first tokens in one block of slots: the weight gradient written, not added.
    compile_variant(kern._grad_kernel, dtype, True,
                    dict(LIST=False, EXCLUDE=False, FUSED=True, HAS_BIAS=False, SOFTCAP=False, UPCAST=False,
                         PRECISION="tf32", STORE=False, GRAD_X=True, GRAD_W=True, GRAD_B=False, FILTER=2.0 ** -12,
                         RMW=False, STORE_W=True, BLOCK_M=16, BLOCK_C=128, BLOCK_H=64), "bf16")
    for gradient, listed in (("bf16", True), ("bf16", False), ("fp32", False)):
        compile_candidates(gradient, listed)
    for weights in (True, False):
        compile_finish(weights)


if __name__ == "__main__":
    main()
