"""The static int8 layers' own calls with their rows padded to a step, against the rows as they come: what the
padding costs on call shapes met, saves on shapes not met, and what each way keeps in memory.

The continuous engine calls each static layer on the rows still running (:class:`~earlyexit_kernels.engine.layers.
ov_static.StaticOvLayer`: the length padded to 8, the rows as they come), so a server meets new (rows, length)
shapes for minutes, and the CPU plugin keeps what it prepares for each (``benchmarks/micro/ov_shape_memory.py``).
Padding the rows to a multiple of ``--pad-rows`` (zero rows whose keys are all masked, as the exit graph pads its
survivors) bounds the shapes at the price of the rows added. This times it: an ``eek fit`` folder on the static
layers, loaded as served (``--dtype int8``); ``--calls`` calls of 1 to ``--max-rows`` texts drawn from ``--texts``
(seeded, the same calls for every setting), their embeddings made once; each call through every layer in turn (full
depth: every row stays). The first pass meets every shape fresh, the next ``--passes`` meet them again; after each,
its seconds and glibc's bytes in use. One setting a process (the plugin's caches are the process's): run it once
per ``--pad-rows`` and alternate the runs::

    for round in 1 2; do for step in 1 8; do
        python benchmarks/micro/static_row_padding.py FOLDER --texts rt-test.txt --pad-rows $step --output R$round-$step.json
    done; done
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root

from benchmarks.micro.ov_shape_memory import (  # noqa: E402  (the calls drawn and the folder read as it does)
    add_call_arguments,
    draw_calls,
    in_use_mib,
    read_lines,
    static_folder,
    with_growth,
)


def padded_rows(hidden: torch.Tensor, mask: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden`` [n, S, H] and its 2-D ``mask`` with zero rows added up to a multiple of ``step``, their keys all
    masked (a real row never reads them; each added row attends evenly to its own zeros)."""
    rows = hidden.shape[0]
    added = -(-rows // step) * step - rows
    if not added:
        return hidden, mask
    return (
        torch.cat([hidden, hidden.new_zeros(added, *hidden.shape[1:])]),
        torch.cat([mask, mask.new_zeros(added, mask.shape[1])]),
    )


def full_depth(layers, hidden: torch.Tensor, mask: torch.Tensor, step: int) -> torch.Tensor:
    """Every layer in turn on ``hidden``'s rows, padded to ``step``; the real rows' output."""
    rows = hidden.shape[0]
    hidden, mask = padded_rows(hidden, mask, step)
    for layer in layers:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:rows]


def run_passes(layers, inputs: list[tuple[torch.Tensor, torch.Tensor]], step: int, passes: int) -> list[dict]:
    """A first pass and ``passes`` more over ``inputs``: each pass's seconds and the bytes in use after it."""
    readings = []
    with torch.inference_mode():
        for index in range(1 + passes):
            start = time.perf_counter()
            for hidden, mask in inputs:
                full_depth(layers, hidden, mask, step)
            readings.append(
                {"first": index == 0, "seconds": round(time.perf_counter() - start, 3), "in_use_mib": in_use_mib()}
            )
    return readings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_call_arguments(parser, "calls (default 300)")
    parser.add_argument("--pad-rows", type=int, default=1, help="rows padded to a multiple of this (1: as they come)")
    parser.add_argument("--passes", type=int, default=3, help="passes after the first (default 3)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="a JSON file for the readings")
    args = parser.parse_args(argv)
    if min(args.pad_rows, args.calls, args.max_rows, args.passes) < 1 or args.max_length < 8:
        parser.error("--pad-rows, --calls, --max-rows and --passes must be >= 1 and --max-length >= 8")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    from earlyexit_kernels.engine.layers.ort_layer import encoder_layers
    from earlyexit_kernels.engine.layers.packed_call_shapes import LENGTH_STEP

    model, tokenizer = static_folder(args.folder)
    layers = list(encoder_layers(model))
    if any(layer.position_bias for layer in layers):
        raise SystemExit(f"{args.folder}'s layers read a relative position bias (MPNet): this times BERT-style layers")
    texts = read_lines(args.texts)
    calls = draw_calls(texts, args.calls, args.max_rows, seed=1)
    inputs = []
    with torch.inference_mode():
        for call in calls:
            encoded = tokenizer(call, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
            hidden = model.base_model.embeddings(input_ids=encoded["input_ids"])
            inputs.append((hidden, encoded["attention_mask"]))
    loaded = in_use_mib()
    readings = with_growth(run_passes(layers, inputs, args.pad_rows, args.passes), loaded)
    for reading in readings:
        print(
            f"{'first' if reading['first'] else 'again'}: {reading['seconds']:.2f} s, in use "
            f"{reading['in_use_mib']:.1f} MiB ({reading['grew_mib']:+.1f})",
            flush=True,
        )
    rows = sum(hidden.shape[0] for hidden, _ in inputs)
    padded = sum(-(-hidden.shape[0] // args.pad_rows) * args.pad_rows for hidden, _ in inputs)
    if args.output is not None:
        from benchmarks.suite.script_results import run_conditions, write_json

        record = {
            **run_conditions("benchmarks/micro/static_row_padding.py", argv, started),
            "folder": Path(args.folder).name,
            "pad_rows": args.pad_rows,
            "calls": args.calls,
            "rows": rows,
            "rows_run": padded,
            "shapes": len(
                {(-(-h.shape[0] // args.pad_rows) * args.pad_rows, -(-h.shape[1] // LENGTH_STEP)) for h, _ in inputs}
            ),
            "in_use_after_load_mib": round(loaded, 1),
            "passes": readings,
        }
        write_json(args.output, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
