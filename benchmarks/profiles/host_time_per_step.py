"""Host time of one exit step with the kernel launch replaced by a no-op.

    .venv/bin/python benchmarks/profiles/host_time_per_step.py [--batch 64] [--hidden 768] [--labels 2]
        [--calls 2000] [--repeats 7] [--device cpu|cuda] [--output benchmarks/results/unknown_cpu/host_time_cpu.txt]

What a step costs the CPU before the GPU sees a kernel: the Python wrapper, policy
lowering, output allocation, argument checks and, for the registered ``torch.library``
ops, the dispatcher's argument handling. On a GPU a step whose host time exceeds the
kernels' time leaves the GPU waiting; a BERT-base layer at B = 64 takes about 200 us of
GPU time, so the host must stay well below that.

Paths measured, each on CPU tensors with the step's real shapes:

- Triton, eager (what the engine calls): ``head_exit_step_write_back`` (the fused step:
  head launch + decision launch with the write-back), ``exit_step_write_back`` (the
  decision alone) and ``compact``, with ``JITFunction.run`` (Triton's launch: argument
  binding, cache lookup, driver launch) replaced by a no-op, so Triton's own launch cost
  is not included: it needs a GPU driver.
- Triton through the registered ops (what ``torch.compile`` traces), called eagerly, for
  comparison: ``torch.ops.earlyexit.exit_head`` / ``exit_decide`` / ``compact``.
- C++ / CUDA (``cpp_backend``): the CUDA kernels cannot run without a CUDA build of torch;
  what runs here is the same Python wrapper, dispatcher and binding-side preparation
  (``prepare_exit_call`` in ``csrc/common/exit_op.h``: checks, allocations, pointers)
  through the CPU op, which runs the CPU rule instead of launching a kernel. Measured on
  ``exit_step_write_back`` with the step's batch (the CPU rule on B rows included) and
  with 0 rows (no kernel work: the binding alone).

Times are the median (and the minimum, less disturbed by other work on the machine) over
``--repeats`` runs of ``--calls`` calls each, in microseconds per call, on one thread
(``torch.set_num_threads(1)``).

``--device cuda`` (a GPU): the same steps on CUDA tensors with real launches, Triton's and the
CUDA C++ backend's, timed until the last call returns (launches are asynchronous: that is
the host's cost while the GPU keeps up; 100 calls per run, so the launch queue never fills),
with a synchronization between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# The kernels are the GPU's, not the interpreter's: on the CPU their launch is stubbed below.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.backends.write_back import WriteBack  # noqa: E402
from earlyexit_kernels.methods import exit_rules  # noqa: E402


@contextlib.contextmanager
def launches_stubbed():
    """Every Triton kernel launch returns at once (nothing is compiled or run)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run
    calls = [0]

    def no_launch(self, *args, grid, warmup, **kwargs):
        calls[0] += 1

    JITFunction.run = no_launch
    try:
        yield calls
    finally:
        JITFunction.run = original


@contextlib.contextmanager
def through_registered_ops(tk, tc):
    """Route the eager Triton wrappers through the torch.library ops, as torch.compile traces them."""
    saved = [(m, m._use_ops) for m in (tk, tc)]
    for m in (tk, tc):
        m._use_ops = lambda: True
    try:
        yield
    finally:
        for m, fn in saved:
            m._use_ops = fn


def per_call_us(fn, calls: int, repeats: int, sync=None) -> tuple[float, float]:
    """(median, minimum) over ``repeats`` runs of the time per call of ``calls`` calls, in us."""
    for _ in range(max(calls // 10, 20)):
        fn()
    runs = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter_ns() - start) / calls / 1e3)
    return statistics.median(runs), min(runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="padded length of the hidden states (compact)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA GPU")
        if args.calls > 100:
            args.calls = 100  # at most 200 launches in flight: the launch queue never fills
    device = torch.device(args.device)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    from earlyexit_kernels.backends import cpp_backend
    from earlyexit_kernels.backends.triton_kernels import compact as tc
    from earlyexit_kernels.backends.triton_kernels import exit_step as tk

    b, h, c, layers = args.batch, args.hidden, args.labels, args.layers
    dtype = torch.float16
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, args.seq, h, generator=g).to(device, dtype)
    cls = hidden[:, 0]
    wp, bp = torch.randn(h, h, generator=g).to(device, dtype), torch.randn(h, generator=g).to(device, dtype)
    wi, bi = torch.randn(c, h, generator=g).to(device, dtype), torch.randn(c, generator=g).to(device, dtype)
    logits = torch.randn(b, c, generator=g).to(device, dtype)
    mask = torch.ones(b, args.seq, dtype=torch.long, device=device)
    index = torch.arange(0, b, 2, device=device)

    def target(rows=b):
        return WriteBack(
            torch.arange(rows, device=device),
            torch.full((rows,), 3, dtype=torch.long, device=device),
            torch.full((rows,), args.seq, dtype=torch.long, device=device),
            torch.zeros(b, c, dtype=dtype, device=device),
            torch.zeros(b, dtype=torch.long, device=device),
            torch.zeros(b, dtype=torch.long, device=device),
        )

    cases = []
    for name, policy in (("Entropy(0.3)", eek.Entropy(0.3)), ("Patience(2)", eek.Patience(2))):
        state = exit_rules.init_state(policy, b, c, h, layers, device)
        tgt = target()
        cases.append(
            (
                f"triton fused step, {name}",
                "triton",
                lambda policy=policy, state=state, tgt=tgt: tk.head_exit_step_write_back(
                    policy, 3, layers, cls, wp, bp, wi, bi, dict(state), None, tgt
                ),
            )
        )
        cases.append(
            (
                f"triton decision + write-back, {name}",
                "triton",
                lambda policy=policy, state=state, tgt=tgt: tk.exit_step_write_back(
                    policy, 3, layers, logits, None, dict(state), tgt
                ),
            )
        )
    cases.append(("triton compact", "triton", lambda: tc.compact(hidden, mask, index, args.seq - 8)))

    cuda = args.device == "cuda"
    lines = [
        "Host time per exit step, "
        + ("real launches on the GPU" if cuda else "kernel launch replaced by a no-op")
        + f" (microseconds per call: median [minimum] of {args.repeats} runs of {args.calls} calls)",
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{'GPU: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
        f"torch {torch.__version__}, python {platform.python_version()}, 1 torch thread",
        f"shapes: B = {b}, H = {h}, C = {c}, S = {args.seq}, float16, layer 3 of {layers}",
        f"command: python benchmarks/profiles/host_time_per_step.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        "",
    ]

    printed = [0]

    def flush():
        print("\n".join(lines[printed[0] :]), flush=True)
        printed[0] = len(lines)

    def line(value, label):
        lines.append(f"{value[0]:8.1f} [{value[1]:6.1f}] us  {label}")
        flush()

    flush()
    if cuda:
        sync = torch.cuda.synchronize
        for label, _, fn in cases:
            line(per_call_us(fn, args.calls, args.repeats, sync), f"{label} (eager)")
        if eek.backends()["cuda"]:
            policy = eek.Entropy(0.3)
            state = exit_rules.init_state(policy, b, c, h, layers, device)
            tgt = target()
            cpp_cases = [
                (
                    "cuda C++ fused step, Entropy(0.3)",
                    lambda: cpp_backend.head_exit_step_write_back(
                        policy, 3, layers, cls, wp, bp, wi, bi, dict(state), None, tgt
                    ),
                ),
                (
                    "cuda C++ decision + write-back, Entropy(0.3)",
                    lambda: cpp_backend.exit_step_write_back(policy, 3, layers, logits, None, dict(state), tgt),
                ),
                ("cuda C++ compact", lambda: cpp_backend.compact(hidden, mask, index, args.seq - 8)),
            ]
            for label, fn in cpp_cases:
                line(per_call_us(fn, args.calls, args.repeats, sync), label)
        else:
            lines.append(f"cuda backend unavailable: {eek.backend_status()['cuda']}")
    else:
        with launches_stubbed() as launched:
            for label, _, fn in cases:
                before = launched[0]
                fn()
                per = launched[0] - before
                line(
                    per_call_us(fn, args.calls, args.repeats),
                    f"{label} (eager, {per} launch{'es' if per != 1 else ''})",
                )
            if hasattr(tk, "_use_ops"):
                with through_registered_ops(tk, tc):
                    for label, _, fn in cases:
                        value = per_call_us(fn, max(args.calls // 4, 1), args.repeats)
                        line(value, f"{label} (through the registered torch.library ops)")

        if eek.backends()["cpp"]:
            lines.append("")
            policy = eek.Entropy(0.3)
            for rows in (b, 0):
                z = logits[:rows]
                state = exit_rules.init_state(policy, rows, c, h, layers, device)
                tgt = target(rows)
                value = per_call_us(
                    lambda z=z, state=state, tgt=tgt: cpp_backend.exit_step_write_back(
                        policy, 3, layers, z, None, dict(state), tgt
                    ),
                    args.calls,
                    args.repeats,
                )
                what = f"{rows} rows, CPU rule included" if rows else "0 rows: wrapper, dispatcher and binding only"
                line(value, f"cpp/cuda decision + write-back through the CPU op, Entropy(0.3) ({what})")
            lines.append("(the CUDA op shares this wrapper and prepare_exit_call; its launch is not measurable here)")
        else:
            lines.append(f"cpp backend unavailable: {eek.backend_status()['cpp']}")

    if printed[0] < len(lines):
        flush()
    report = "\n".join(lines) + "\n"
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
