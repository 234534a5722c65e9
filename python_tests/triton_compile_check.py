"""Compile every Triton kernel for real GPU targets with Triton's own compiler, no GPU needed.

    .venv/bin/python python_tests/triton_compile_check.py      (run by scripts/check_cuda_compile.sh)

The CPU suite runs the kernels in Triton's interpreter, which accepts code the compiler
rejects (types, layouts, an int64 pointer offset that is not). This compiles each kernel
with its launch-time signature for sm_90 (and the head for sm_80, the two targets the
package builds for) through ptxas: every policy of the decision kernel with and without the
partials and the write-back, the head in each dtype, the gather with int32 and int64
indices and strides. Exit status 1 on the first failure, with its message.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from earlyexit_kernels.triton_kernels import compact as tc  # noqa: E402
from earlyexit_kernels.triton_kernels import exit_step as tk  # noqa: E402


def compile_kernel(kernel, types: dict, constexprs: dict, arch: int, num_warps: int = 4) -> None:
    names = [p.name for p in kernel.params]
    missing = set(names) - set(types) - set(constexprs)
    assert not missing, f"{kernel.fn.__name__}: no type for {sorted(missing)}"
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in names}
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def head_variants():
    for arch in (90, 80):
        for dtype, dot_fp32 in (("fp16", False), ("bf16", False), ("fp32", True)):
            types = {name: "i32" for name in ("stride_hn", "stride_hk", "stride_wpo", "stride_wpi", "stride_bp")}
            types.update({name: "i32" for name in ("stride_wic", "stride_wik", "n", "H", "C")})
            types.update({name: f"*{dtype}" for name in ("h_ptr", "wp_ptr", "bp_ptr", "wi_ptr", "pooled_ptr")})
            types["zpart_ptr"] = "*fp32"
            constexprs = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_C=16, DOT_FP32=dot_fp32, WRITE_POOLED=True)
            yield f"head {dtype} sm_{arch}", tk._head_kernel, types, constexprs, arch


# The state slots' element types per policy (s0, s1) and the aux tensor's.
SLOTS = {
    tk.ENTROPY: ("*fp32", "*fp32"),
    tk.MAXPROB: ("*fp32", "*fp32"),
    tk.PATIENCE_CLS: ("*i64", "*i32"),
    tk.PATIENCE_REG: ("*fp32", "*i32"),
    tk.QEXIT: ("*fp32", "*fp32"),
    tk.VOTING: ("*i32", "*fp32"),
    tk.DACT_CODE: ("*fp32", "*fp32"),
    tk.SCHEDULED: ("*fp32", "*fp32"),
}


def decide_variants():
    ints = ("stride_sn", "stride_sc", "num_tiles", "stride_b", "stride_halt", "stride_aux_n", "stride_aux_l")
    ints += ("stride_out_n", "stride_out_c", "batch_out", "n", "C", "layer", "layers_left", "int_param")
    for policy, (s0, s1) in SLOTS.items():
        for partials, write_back in ((True, True), (True, False), (False, True), (False, False)):
            types = {name: "i32" for name in ints}
            types.update(fa="fp32", fb="fp32", exits_ptr="*i1", returned_ptr="*fp32", halt_ptr="*bf16")
            types.update(src_ptr="*fp32" if partials else "*fp16", bias_ptr="*fp16", logits_ptr="*fp16")
            types.update(s0_ptr=s0, s0_out=s0, s1_ptr=s1, s1_out=s1)
            types["aux_ptr"] = "*i64" if policy == tk.SCHEDULED else "*fp32"
            types.update({name: "*i64" for name in ("order_ptr", "stats_ptr", "rows_ptr", "runs_ptr", "ext_ptr")})
            types.update(out_logits_ptr="*bf16", out_exit_ptr="*i64", out_runs_ptr="*i64")
            constexprs = dict(
                POLICY=policy,
                NORMALIZED=policy == tk.ENTROPY,
                HAS_TEMPERATURE=policy == tk.MAXPROB,
                STOCHASTIC=policy == tk.QEXIT and not write_back,
                FROM_PARTIALS=partials,
                STORE_LOGITS=partials and not write_back,
                STORE_RETURNED=not write_back,
                FORCE_EXIT=False,
                WRITE_BACK=write_back,
                HAS_EXTENTS=write_back,
                BLOCK_M=128,
                BLOCK_C=4,
            )
            what = f"{'partials' if partials else 'logits'}{', write-back' if write_back else ''}"
            yield f"decide policy {policy} ({what}) sm_90", tk._decide_kernel, types, constexprs, 90


def compact_variants():
    for index in ("*i32", "*i64"):
        for stride in ("i32", "i64"):  # a row stride past 2^31 elements comes as int64
            types = dict(src_ptr="*bf16", dst_ptr="*bf16", idx_ptr=index, mask_ptr="*i64", mask_out_ptr="*i64")
            types.update(stride_n=stride, stride_s="i32", stride_h="i32", stride_idx="i32", stride_mn="i32")
            types.update(stride_ms="i32", seq_len="i32", H="i32", s_blocks="i32")
            constexprs = dict(HAS_MASK=True, BLOCK_S=4, BLOCK_H=1024)
            yield f"compact index {index} row stride {stride} sm_90", tc._compact_kernel, types, constexprs, 90


def main() -> int:
    start = time.perf_counter()
    count = 0
    for variants in (head_variants(), decide_variants(), compact_variants()):
        for name, kernel, types, constexprs, arch in variants:
            try:
                compile_kernel(kernel, types, constexprs, arch)
            except Exception as err:  # the compiler's own message says what is wrong
                print(f"triton-check: FAILED {name}: {type(err).__name__}: {err}", file=sys.stderr)
                return 1
            count += 1
    print(f"triton-check: {count} kernel variants compile for sm_80/sm_90 ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
