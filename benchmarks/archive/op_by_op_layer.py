"""One BERT layer through its modules against the same layer op by op, on every position.

Finished investigation: op by op, one layer runs 1.07-1.18x faster at hidden 128, 0.97-1.06x at hidden 384-768
(docs/serving.md, "Many sequences: `eek.classify` and the continuous engine").

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/op_by_op_layer.py --out benchmarks/results/intel_xeon/op_by_op_layer_cpu.md

A random BERT layer (4 x hidden feed-forward, SDPA) on [rows, 36, hidden] with one padded row:
``module``: ``layer(hidden, mask)``, what the unpatched model runs; ``op by op``:
:func:`earlyexit_kernels.engine.layers.packed_layer.run_packed` without positions, which the continuous
engine runs on every call it does not pack (the same operations on the same weights, without
the modules' Python; with the C++ extension built, this SDPA layer is one C++ operator; the outputs are compared bit for bit). Median of 15 interleaved rounds
of ``--calls`` calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from earlyexit_kernels.backends.compaction import layer_attention_mask
from earlyexit_kernels.engine.layers.packed_layer import run_packed

LENGTH = 36


def measure(hidden: int, rows: int, calls: int) -> tuple[float, float]:
    """Seconds per call of (module, op by op)."""
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=1, num_attention_heads=max(2, hidden // 64), intermediate_size=4 * hidden
    )
    layer = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval().bert.encoder.layer[0]
    lengths = torch.full((rows,), LENGTH)
    lengths[0] = LENGTH - 6
    mask = torch.arange(LENGTH)[None, :] < lengths[:, None]
    hidden_states = torch.randn(rows, LENGTH, hidden, generator=torch.Generator().manual_seed(0))
    layer_mask = layer_attention_mask(mask, "sdpa", torch.float32)
    with torch.no_grad():

        def module():
            return layer(hidden_states, layer_mask)

        def op_by_op():
            return run_packed(layer, hidden_states, None, layer_mask)

        if not torch.equal(module(), op_by_op()):
            raise AssertionError("op by op differs from the module")
        samples = {module: [], op_by_op: []}
        for _ in range(15):
            for fn in samples:
                began = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[fn].append((time.perf_counter() - began) / calls)
    return statistics.median(samples[module]), statistics.median(samples[op_by_op])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="128,384,768")
    parser.add_argument("--rows", default="4,16,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the table there (markdown)")
    args = parser.parse_args()
    lines = [
        "| threads | hidden | rows | module (us) | op by op (us) | module / op by op |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for hidden in (int(h) for h in args.hidden.split(",")):
            for rows in (int(r) for r in args.rows.split(",")):
                module, op_by_op = measure(hidden, rows, args.calls)
                lines.append(
                    f"| {threads} | {hidden} | {rows} | {module * 1e6:.0f} | {op_by_op * 1e6:.0f} | "
                    f"{module / op_by_op:.3f}x |"
                )
                print(lines[-1], flush=True)
    if args.out is not None:
        command = "python benchmarks/archive/op_by_op_layer.py " + " ".join(
            f"--{name} {value}"
            for name, value in (("hidden", args.hidden), ("rows", args.rows), ("threads", args.threads))
        )
        header = [
            "# One BERT layer through its modules against the same layer op by op",
            "",
            f"`{command}` on this project's 2-core CPU (no GPU), alone under an exclusive lock. "
            f"[rows, {LENGTH}, hidden], one row padded, SDPA; median of 15 interleaved rounds; "
            "the two outputs equal bit for bit.",
            "",
        ]
        args.out.write_text("\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
