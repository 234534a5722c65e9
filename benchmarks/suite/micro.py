"""Microbenchmarks of the two per-layer operations, per implementation.

Exit step (the head on the [CLS] state, then the policy's rule), on ``[B, S, H]`` hidden
states, policy ``Entropy(0.3)``, 2 labels:

- ``cpp`` / ``triton`` / ``cuda``: the backend's fused ``head_exit_step``;
- ``torch``: :func:`earlyexit_kernels.methods.exit_rules.head_exit_step` (the eager reference, as
  one function);
- ``naive``: the model's pooler and classifier modules, then the eager exit step, then the
  boolean-mask write-back of the exiting rows, as :func:`.baselines.naive_batched` does.

Compaction (keep every other row, trim 1/8 of the positions):

- ``cpp`` / ``triton`` / ``cuda``: the backend's gather kernel;
- ``torch``: :func:`earlyexit_kernels.backends.compaction.compact` (``index_select`` + slice);
- ``naive``: ``hidden[keep]`` and ``mask[keep]`` (boolean indexing, no trimming).

    python -m benchmarks.suite.micro --output-dir DIR            # DIR/micro.csv and DIR/exit_step_vs_batch.png
    python -m benchmarks.suite.micro --append-csv DIR/bench.csv  # beside a sweep's rows, as the committed CSVs hold them

The rows have the sweep's CSV schema (``kind`` ``exit_step`` or ``compact``), so
``python -m benchmarks.suite.report`` reads them from the same file. The callables are also
``benchmarks/micro/bench_cpu_micro.py``'s (pytest-benchmark). Until issue 75 the sweep ran these
at the end of every run (``--no-micro`` to skip them).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from earlyexit_kernels.backends import compaction
from earlyexit_kernels.backends.registry import resolve_backend
from earlyexit_kernels.bench.models import SIZES
from earlyexit_kernels.bench.results import append_csv, environment, write_csv
from earlyexit_kernels.bench.sweep import DTYPES, fast_backends
from earlyexit_kernels.bench.timing import percentiles, time_loop, timed_call
from earlyexit_kernels.methods import exit_rules
from earlyexit_kernels.methods.policies import Entropy

__all__ = ["MICRO_POLICY", "micro_impls", "exit_step_fn", "compact_fn", "micro_rows", "main"]

MICRO_POLICY = Entropy(0.3)
LABELS = 2


def micro_impls(device: torch.device) -> list[str]:
    """The implementations that run on ``device``: fast backends first, then torch and naive."""
    return [*fast_backends(device), "torch", "naive"]


def _weights(hidden_size: int, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    wp = torch.randn(hidden_size, hidden_size, generator=g) / math.sqrt(hidden_size)
    wi = torch.randn(LABELS, hidden_size, generator=g) / math.sqrt(hidden_size)
    return [t.to(device=device, dtype=dtype) for t in (wp, torch.zeros(hidden_size), wi, torch.zeros(LABELS))]


def exit_step_fn(
    impl: str, batch: int, seq_len: int, hidden_size: int, num_layers: int, device, dtype, seed: int = 0
) -> Callable[[], object]:
    """A no-argument callable running one exit step of ``impl`` at layer 3 on ``batch`` rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=g).to(device=device, dtype=dtype)
    wp, bp, wi, bi = _weights(hidden_size, device, dtype, seed + 1)
    state = exit_rules.init_state(MICRO_POLICY, batch, LABELS, hidden_size, num_layers, device, pooled_dtype=dtype)
    policy, layer = MICRO_POLICY, 3
    if impl == "naive":
        pooler = torch.nn.Linear(hidden_size, hidden_size).to(device=device, dtype=dtype)
        classifier = torch.nn.Linear(hidden_size, LABELS).to(device=device, dtype=dtype)
        with torch.no_grad():
            pooler.weight.copy_(wp), pooler.bias.copy_(bp), classifier.weight.copy_(wi), classifier.bias.copy_(bi)
        out_logits = torch.zeros(batch, LABELS, dtype=dtype, device=device)
        rows = torch.arange(batch, device=device)

        def run():
            logits = classifier(torch.tanh(pooler(hidden[:, 0])))
            exits, returned, _ = exit_rules.exit_step(policy, layer, num_layers, logits, None, state)
            out_logits[rows[exits]] = returned[exits].to(dtype)
            return exits

        return run
    fn = exit_rules.head_exit_step if impl == "torch" else resolve_backend(impl, device).head_exit_step

    def run():
        return fn(policy, layer, num_layers, hidden[:, 0], wp, bp, wi, bi, state)

    return run


def compact_fn(impl: str, batch: int, seq_len: int, hidden_size: int, device, dtype, seed: int = 0):
    """``(callable, bytes moved)`` for one compaction of ``impl``: every other row kept, 1/8 of S trimmed."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=g).to(device=device, dtype=dtype)
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    keep = torch.arange(batch, device=device) % 2 == 0
    count = int(keep.sum())
    index = compaction.survivor_index(keep, count)
    new_len = max(1, seq_len - seq_len // 8)
    if impl == "naive":

        def run():
            return hidden[keep], mask[keep]

        moved = 2 * count * seq_len * (hidden_size * hidden.element_size() + mask.element_size())
        return run, moved
    fn = compaction.compact if impl == "torch" else resolve_backend(impl, device).compact

    def run():
        return fn(hidden, mask, index, new_len)

    return run, 2 * count * new_len * (hidden_size * hidden.element_size() + mask.element_size())


def micro_rows(args, device, dtype, size) -> list[dict]:
    """Every implementation's exit step and compaction at each of ``args.batch_sizes``, the shortest length."""
    rows = []
    seq_len = min(args.seq_lens)
    target = 0.002 if args.smoke else 0.02  # seconds per timed loop
    for kind in ("exit_step", "compact"):
        for impl in micro_impls(device):
            for batch in args.batch_sizes:
                if kind == "exit_step":
                    fn = exit_step_fn(impl, batch, seq_len, size.hidden, size.layers, device, dtype)
                else:
                    fn, _ = compact_fn(impl, batch, seq_len, size.hidden, device, dtype)
                once, _ = timed_call(fn, device)
                iterations = max(3, min(2000, int(target / max(once, 1e-7))))
                samples = [time_loop(fn, device, iterations) for _ in range(max(args.repeats, 3))]
                stats = percentiles(samples)
                rows.append(
                    {
                        "kind": kind,
                        "method": impl,
                        "backend": impl,
                        "B": batch,
                        "S": seq_len,
                        "L": size.layers,
                        "pattern": "Entropy(0.3)" if kind == "exit_step" else "keep 1/2, trim 1/8",
                        "t_p20_s": stats["p20"],
                        "t_p50_s": stats["p50"],
                        "t_p80_s": stats["p80"],
                        "repeats": len(samples),
                    }
                )
    return rows


def micro_plot(rows: list[dict], path: Path) -> Path | None:
    """``exit_step_vs_batch.png``: time per call against the batch size, a line per implementation (p50, band p20-p80)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("exit_step", "compact") if any(r["kind"] == k for r in rows)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.0 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = [r for r in rows if r["kind"] == kind]
        for impl in sorted({r["method"] for r in mine}):
            pts = sorted(
                (int(r["B"]), float(r["t_p20_s"]), float(r["t_p50_s"]), float(r["t_p80_s"]))
                for r in mine
                if r["method"] == impl
            )
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[2] * 1e6 for p in pts], marker="o", ms=3, label=impl)
            ax.fill_between(xs, [p[1] * 1e6 for p in pts], [p[3] * 1e6 for p in pts], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size (active rows)")
        ax.set_ylabel("time per call (us)")
        s = mine[0]["S"]
        what = "exit step (head + Entropy rule)" if kind == "exit_step" else "compaction (keep 1/2, trim 1/8)"
        ax.set_title(f"{what}, S={s}", fontsize=9)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first.get('device_name', '')}, {first.get('config', '')} {first.get('dtype', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite.micro", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--size", choices=sorted(SIZES), help="default: base on CUDA, small on CPU")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128", help="comma-separated [1,8,32,64,128]")
    parser.add_argument("--seq-len", type=int, default=128, help="[128]")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per point, at least 3 [5]")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--smoke", action="store_true", help="short timed loops: checks it runs")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output-dir", type=Path, help="writes micro.csv and exit_step_vs_batch.png there")
    where.add_argument("--append-csv", type=Path, help="appends the rows to this CSV (a sweep's bench.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    size = SIZES[args.size or ("base" if device.type == "cuda" else "small")]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.seq_lens = [args.seq_len]
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.inference_mode():
        measured = micro_rows(args, device, DTYPES[args.dtype], size)
    common = {**environment(device), "config": size.label, "dtype": args.dtype, "attn": "-", "model": "-"}
    rows = [{**common, **row} for row in measured]
    if args.append_csv is not None:
        append_csv(args.append_csv, rows)
        print(f"appended {len(rows)} rows to {args.append_csv}", file=sys.stderr)
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_csv(args.output_dir / "micro.csv", rows)
    plot = micro_plot(
        [{k: ("" if v is None else v) for k, v in r.items()} for r in rows], args.output_dir / "exit_step_vs_batch.png"
    )
    print(f"wrote {args.output_dir / 'micro.csv'} ({len(rows)} rows){', ' + plot.name if plot else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
