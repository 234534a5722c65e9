"""Compile every Triton kernel for real GPU targets with Triton's own compiler, no GPU needed.

    make triton-check          (part of `make test` where Triton is installed)
    .venv/bin/python python_tests/triton_compile_check.py [--write benchmarks/results/any_device/triton_check.md]

The CPU suite runs the kernels in Triton's interpreter, which accepts code the compiler
rejects (types, layouts, an int64 pointer offset that is not). This compiles each kernel
with its launch-time signature for sm_90 (and the head for sm_80, the two targets the
package builds for) through ptxas: every policy of the decision kernel with and without the
partials and the write-back, the head in each dtype (tanh and GELU), the pooling with and
without the LayerNorm, the gather with int32 and int64
indices and strides, each with the block sizes and warps its launcher picks on a GPU. The
table (kernel, variant, arch, registers and stack frame of the cubin Triton built, shared
memory, tensor-core instructions in the PTX: ``wgmma`` (sm_90) and ``mma.sync``)
is printed, and written with ``--write``. Exit status 1 on a compile error or on any
stack frame (local memory: register spills), with its message.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from earlyexit_kernels.backends.triton_kernels import compact as tc  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import exit_decide as tkd  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import exit_head as tkh  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import pool_norm as tpn  # noqa: E402
from earlyexit_kernels.backends.triton_kernels import survivor_gather as tsg  # noqa: E402


def compile_kernel(kernel, types: dict, constexprs: dict, arch: int, num_warps: int = 4):
    names = [p.name for p in kernel.params]
    missing = set(names) - set(types) - set(constexprs)
    assert not missing, f"{kernel.fn.__name__}: no type for {sorted(missing)}"
    signature = {name: ("constexpr" if name in constexprs else types[name]) for name in names}
    source = ASTSource(
        fn=kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def resource_usage(compiled, arch: int) -> dict:
    """Registers and stack frame of the cubin Triton built (``cuobjdump -res-usage``), its shared
    memory, and the tensor-core instructions of its PTX (``wgmma`` on sm_90, ``mma.sync`` on sm_80).

    A stack frame is local memory: register spills or an array indexed at run time.
    """
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(compiled.asm["cubin"])
        report = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage: {report[-500:]}")
    registers, stack, local = (int(v) for v in match.groups())
    ptx = compiled.asm["ptx"].splitlines()
    counts = {kind: sum(kind in line for line in ptx) for kind in ("wgmma.mma_async", "mma.sync")}
    return dict(
        registers=registers,
        stack=stack + local,
        shared=int(compiled.metadata.shared),
        tensor_core=", ".join(f"{n} {kind.split('.')[0]}" for kind, n in counts.items() if n) or "0",
    )


def head_variants():
    # The launcher's GPU blocks (tkh._head_blocks, the same for every row count) at BERT-base's H.
    for arch in (90, 80):
        for dtype, dot_fp32 in (("fp16", False), ("bf16", False), ("fp32", True)):
            for rows in (64,):
                block_m, block_n, block_k, warps = tkh._head_blocks(rows, 768, dot_fp32)
                # the model's tanh head (pooled out for a halting head), and an MLP head's GELU
                for write_pooled, gelu in ((True, False), (False, False), (False, True)):
                    types = {
                        name: "i32" for name in ("stride_hn", "stride_hk", "stride_wpo", "stride_wpi", "stride_bp")
                    }
                    types.update({name: "i32" for name in ("stride_wic", "stride_wik", "n", "H", "M", "C")})
                    types.update({name: f"*{dtype}" for name in ("h_ptr", "wp_ptr", "bp_ptr", "wi_ptr", "pooled_ptr")})
                    types["zpart_ptr"] = "*fp32"
                    constexprs = dict(
                        BLOCK_M=block_m,
                        BLOCK_N=block_n,
                        BLOCK_K=block_k,
                        BLOCK_C=16,
                        DOT_FP32=dot_fp32,
                        WRITE_POOLED=write_pooled,
                        GELU=gelu,
                    )
                    variant = (
                        f"{dtype}, BLOCK_M/N/K {block_m}/{block_n}/{block_k}, {warps} warps"
                        f"{', pooled out' if write_pooled else ''}{', GELU' if gelu else ''}"
                    )
                    yield "head", variant, tkh._head_kernel, types, constexprs, arch, warps


# The state slots' element types per policy (s0, s1).
SLOTS = {
    tkd.ENTROPY: ("*fp32", "*fp32"),
    tkd.MAXPROB: ("*fp32", "*fp32"),
    tkd.PATIENCE_CLS: ("*i64", "*i32"),
    tkd.PATIENCE_REG: ("*fp32", "*i32"),
    tkd.QEXIT: ("*fp32", "*fp32"),
    tkd.VOTING: ("*i32", "*fp32"),
    tkd.DACT_CODE: ("*fp32", "*fp32"),
    tkd.SCHEDULED: ("*fp32", "*fp32"),
}

POLICY_NAMES = {
    tkd.ENTROPY: "Entropy",
    tkd.MAXPROB: "MaxProb",
    tkd.PATIENCE_CLS: "Patience",
    tkd.PATIENCE_REG: "Patience (regression)",
    tkd.QEXIT: "QExit",
    tkd.VOTING: "Voting",
    tkd.DACT_CODE: "DACT",
    tkd.SCHEDULED: "Scheduled",
}


def decide_variants():
    # The launcher's GPU blocks: BLOCK_M 128 (256 with the write-back), BLOCK_C = next power of 2 of C.
    ints = ("stride_sn", "stride_sc", "num_tiles", "stride_b", "stride_halt", "stride_aux_n", "stride_aux_l")
    ints += ("stride_out_n", "stride_out_c", "batch_out", "n", "C", "layer", "layers_left", "int_param")
    for arch, policy, (s0, s1), block_m, (partials, write_back) in (
        (arch, policy, slots, block_m, combination)
        for arch in (90, 80)
        for policy, slots in SLOTS.items()
        for block_m in (128, 256)
        for combination in ((True, True), (True, False), (False, True), (False, False))
    ):
        launch = tkd._decide_launch(block_m, 3, write_back)
        if launch[0] != block_m:  # the block size the launcher takes for this path only
            continue
        if True:
            types = {name: "i32" for name in ints}
            types.update(fa="fp32", fb="fp32", exits_ptr="*i1", returned_ptr="*fp32", halt_ptr="*bf16")
            types.update(src_ptr="*fp32" if partials else "*fp16", bias_ptr="*fp16", logits_ptr="*fp16")
            types.update(s0_ptr=s0, s0_out=s0, s1_ptr=s1, s1_out=s1)
            types["aux_ptr"] = "*i64" if policy == tkd.SCHEDULED else "*fp32"
            types.update({name: "*i64" for name in ("order_ptr", "stats_ptr", "rows_ptr", "runs_ptr", "ext_ptr")})
            types.update(out_logits_ptr="*bf16", out_exit_ptr="*i64", out_runs_ptr="*i64")
            constexprs = dict(
                POLICY=policy,
                NORMALIZED=policy == tkd.ENTROPY,
                HAS_TEMPERATURE=policy == tkd.MAXPROB,
                STOCHASTIC=policy == tkd.QEXIT and not write_back,
                FROM_PARTIALS=partials,
                STORE_LOGITS=partials and not write_back,
                STORE_RETURNED=not write_back,
                FORCE_EXIT=False,
                WRITE_BACK=write_back,
                HAS_EXTENTS=write_back,
                BLOCK_M=block_m,
                BLOCK_C=4,
            )
            what = f"{'partials' if partials else 'logits'}{', write-back' if write_back else ''}"
            name = POLICY_NAMES[policy]
            warps = launch[3]
            yield (
                "decide",
                f"{name}, {what}, BLOCK_M {block_m}, {warps} warps",
                tkd._decide_kernel,
                types,
                constexprs,
                arch,
                warps,
            )


def pool_norm_variants():
    # The launcher's GPU blocks (tpn._pool_blocks) at H = 768 and 1024: the masked mean with the
    # MLP head's LayerNorm, the mean alone, and the [CLS] vector with the norm.
    for arch in (90, 80):
        for dtype in ("bf16", "fp32"):
            for hidden in (768, 1024):
                block_s, block_h, warps = tpn._pool_blocks(hidden)
                for mean, has_mask, norm in ((True, True, True), (True, True, False), (False, False, True)):
                    types = {name: f"*{dtype}" for name in ("h_ptr", "nw_ptr", "nb_ptr", "out_ptr")}
                    types.update(mask_ptr="*i64", eps="fp32", stride_hn="i64", S="i32", H="i32")
                    types.update({name: "i32" for name in ("stride_hs", "stride_hh", "stride_mn", "stride_ms")})
                    constexprs = dict(MEAN=mean, HAS_MASK=has_mask, NORM=norm, BLOCK_S=block_s, BLOCK_H=block_h)
                    what = ("masked mean" if mean else "[CLS]") + (" + LayerNorm" if norm else "")
                    variant = f"{dtype}, H {hidden}, {what}, BLOCK_S/H {block_s}/{block_h}, {warps} warps"
                    yield "pool_norm", variant, tpn._pool_norm_kernel, types, constexprs, arch, warps


def compact_variants():
    # The launcher's GPU blocks (tc._blocks) at H = 256 and H = 768 (BLOCK_H 1024, masked).
    for arch in (90, 80):
        for index in ("*i32", "*i64"):
            for stride in ("i32", "i64"):  # a row stride past 2^31 elements comes as int64
                for hidden in (256, 768):
                    block_s, block_h, warps = tc._blocks(128, hidden)
                    types = dict(src_ptr="*bf16", dst_ptr="*bf16", idx_ptr=index, mask_ptr="*i64", mask_out_ptr="*i64")
                    types.update(stride_n=stride, stride_s="i32", stride_h="i32", stride_idx="i32", stride_mn="i32")
                    types.update(stride_ms="i32", seq_len="i32", H="i32", s_blocks="i32")
                    constexprs = dict(HAS_MASK=True, BLOCK_S=block_s, BLOCK_H=block_h)
                    variant = f"index {index[1:]}, row stride {stride}, BLOCK_S/H {block_s}/{block_h}, {warps} warps"
                    yield "compact", variant, tc._compact_kernel, types, constexprs, arch, warps


def gather_variants():
    # The graphed step's survivor gather: int32 words (aligned rows) and bytes, 1 and every slot used,
    # BLOCK_N as the launcher takes it for buckets of 64 and 256 rows.
    for arch in (90, 80):
        for word in ("i32", "u8"):
            for num in (1, tsg.SLOTS):
                for block_n in (64, 256):
                    types = dict(order_ptr="*i64", exits_ptr="*i1", rows_ptr="*i64", next_rows_ptr="*i64")
                    types.update(count_ptr="*i64", n="i32", dead="i32")
                    for k in range(tsg.SLOTS):
                        types.update({f"s{k}": f"*{word}", f"d{k}": f"*{word}", f"w{k}": "i32"})
                        types.update({f"ss{k}": "i32", f"ds{k}": "i32"})
                    constexprs = dict(NUM=num, WRITE_ROWS=True, BLOCK=tsg.BLOCK, BLOCK_N=block_n)
                    variant = f"{word} words, {num} tensors, BLOCK_N {block_n}, 4 warps"
                    yield "gather_survivors", variant, tsg._gather_kernel, types, constexprs, arch, 4


HEADER = "| kernel | variant | arch | registers | stack (local) bytes | shared bytes | tensor-core instr. |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Compile every Triton kernel for sm_80 and sm_90; fail on spills.")
    parser.add_argument("--write", metavar="PATH", help="also write the table (markdown) to PATH")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    for variants in (pool_norm_variants(), head_variants(), decide_variants(), compact_variants(), gather_variants()):
        for kernel_name, variant, kernel, types, constexprs, arch, warps in variants:
            try:
                usage = resource_usage(compile_kernel(kernel, types, constexprs, arch, warps), arch)
            except Exception as err:  # the compiler's own message says what is wrong
                print(
                    f"triton-check: FAILED {kernel_name} ({variant}) sm_{arch}: {type(err).__name__}: {err}",
                    file=sys.stderr,
                )
                return 1
            rows.append((kernel_name, variant, arch, usage))
    lines = [HEADER, "|---|---|---|---:|---:|---:|---:|"]
    for kernel_name, variant, arch, u in rows:
        lines.append(
            f"| {kernel_name} | {variant} | sm_{arch} | {u['registers']} | {u['stack']} | {u['shared']} | "
            f"{u['tensor_core']} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    spilled = [f"{k} ({v}) sm_{a}" for k, v, a, u in rows if u["stack"]]
    elapsed = time.perf_counter() - start
    if args.write:
        import triton as _triton

        with open(args.write, "w") as handle:
            handle.write(
                f"Triton {_triton.__version__}; `make triton-check` (python_tests/triton_compile_check.py "
                f"--write {args.write}); registers and stack (local memory: spills) of the cubin Triton built, "
                f"from cuobjdump -res-usage; shared memory from Triton's metadata; tensor-core instructions "
                f"counted in the PTX (wgmma: sm_90's warpgroup MMA; mma: mma.sync). No GPU was used.\n\n" + table
            )
    if spilled:
        print(f"triton-check: FAILED, a stack frame (register spills) in: {', '.join(spilled)}", file=sys.stderr)
        return 1
    print(f"triton-check: {len(rows)} kernel variants compile for sm_80/sm_90 without spills ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
