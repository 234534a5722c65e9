"""Where the static int8 layers' memory grows: on call shapes the process has not met, or on every call.

A served folder on the static int8 layers grew its resident memory for minutes under a steady load
(docs/serving.md, the EPYC's soak), with glibc's bytes in use rising beside it. This tells the two causes apart in
one process: an ``eek fit`` folder fitted on the static layers (``--layers openvino-static``), loaded as it is
served (``--dtype int8``), its own policy, runs two sets of ``--calls`` calls (``A`` and ``B``: each 1 to
``--max-rows`` texts drawn from ``--texts``, tokenized as the server does, a set drawn from its own seed so that
``B`` brings shapes ``A`` did not), in the order ``A, A, B, A, B``; after each pass glibc's bytes in use
(``mallinfo2``) and the pass's seconds. Memory kept for shapes met grows on ``A``'s first pass and on ``B``'s first,
and stays on the passes that repeat them; memory kept by every call grows on every pass.
``--runtime-cache N`` compiles the layers with the CPU plugin's runtime cache held to N entries
(:data:`~earlyexit_kernels.engine.layers.ov_layer.RUNTIME_CACHE_CAPACITY`); oneDNN's own primitive cache is
set before the process starts (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, recorded)::

    python benchmarks/micro/ov_shape_memory.py FOLDER --texts rt-test.txt --calls 300 --threads 1 --output FILE.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root

#: the passes, in order: each set's first pass meets its shapes, a repeated one meets none
PASSES = ("A", "A", "B", "A", "B")


def draw_calls(texts: list[str], count: int, max_rows: int, seed: int) -> list[list[str]]:
    """``count`` calls of 1 to ``max_rows`` texts each, drawn with ``seed``."""
    rng = random.Random(seed)
    return [rng.sample(texts, rng.randint(1, min(max_rows, len(texts)))) for _ in range(count)]


def in_use_mib() -> float:
    from earlyexit_kernels.integrations.server.memory_trim import heap_account

    account = heap_account()
    if account is None:
        raise SystemExit("this C library has no mallinfo2 (glibc >= 2.33): nothing to read")
    return account["in_use"] / 2**20


def add_call_arguments(parser: argparse.ArgumentParser, calls_help: str) -> None:
    """The folder and the calls drawn from ``--texts``, as this script and ``static_row_padding.py`` take them."""
    parser.add_argument("folder", help="an eek fit folder fitted on the static int8 layers (--layers openvino-static)")
    parser.add_argument("--texts", type=Path, required=True, help="texts one a line")
    parser.add_argument("--calls", type=int, default=300, help=calls_help)
    parser.add_argument("--max-rows", type=int, default=40, help="texts a call at most (default 40)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens a text at most (default 128)")


def static_folder(folder: str):
    """``(model, tokenizer)``: ``folder`` loaded as served (``--dtype int8``), refused unless on the static
    int8 layers."""
    from earlyexit_kernels.integrations.model_folder import load_model

    model, tokenizer = load_model(folder, dtype="int8")
    if getattr(model, "eek_int8_recipe", None) != "static-ov":
        raise SystemExit(f"{folder} is not served on the static int8 layers: fit it with --layers openvino-static")
    return model, tokenizer


def read_lines(path: Path) -> list[str]:
    """``path``'s non-empty lines, stripped."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def with_growth(readings: list[dict], loaded: float) -> list[dict]:
    """``readings`` with each one's ``grew_mib`` since the one before (the first: since ``loaded``), MiB rounded."""
    before = loaded
    for reading in readings:
        reading["grew_mib"] = round(reading["in_use_mib"] - before, 1)
        before = reading["in_use_mib"] = round(reading["in_use_mib"], 1)
    return readings


def run_passes(model, tokenizer, sets: dict[str, list[list[str]]], max_length: int) -> list[dict]:
    """Each of :data:`PASSES` over its set's calls: its seconds and the bytes in use after it."""
    readings = []
    seen: set[str] = set()
    with torch.inference_mode():
        for name in PASSES:
            start = time.perf_counter()
            for texts in sets[name]:
                model(**tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
            seconds = time.perf_counter() - start
            readings.append(
                {"pass": name, "first": name not in seen, "seconds": round(seconds, 3), "in_use_mib": in_use_mib()}
            )
            seen.add(name)
    return readings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_call_arguments(parser, "calls in each set (default 300)")
    parser.add_argument("--runtime-cache", type=int, help="the CPU plugin's runtime cache entries (default: its own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="a JSON file for the readings")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.max_rows < 1 or args.max_length < 8:
        parser.error("--calls and --max-rows must be >= 1 and --max-length >= 8")
    if args.runtime_cache is not None and args.runtime_cache < 0:
        parser.error("--runtime-cache must be >= 0")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    from earlyexit_kernels.engine.layers import ov_layer

    ov_layer.RUNTIME_CACHE_CAPACITY = args.runtime_cache
    model, tokenizer = static_folder(args.folder)
    texts = read_lines(args.texts)
    sets = {name: draw_calls(texts, args.calls, args.max_rows, seed) for seed, name in enumerate("AB", start=1)}
    loaded = in_use_mib()
    readings = with_growth(run_passes(model.eval(), tokenizer, sets, args.max_length), loaded)
    for reading in readings:
        print(
            f"{reading['pass']} ({'first' if reading['first'] else 'again'}): {reading['seconds']:.1f} s, in use "
            f"{reading['in_use_mib']:.1f} MiB ({reading['grew_mib']:+.1f})",
            flush=True,
        )
    if args.output is not None:
        from benchmarks.suite.script_results import run_conditions, write_json

        record = {
            **run_conditions("benchmarks/micro/ov_shape_memory.py", argv, started),
            "folder": Path(args.folder).name,
            "calls": args.calls,
            "max_rows": args.max_rows,
            "runtime_cache": args.runtime_cache,
            "onednn_primitive_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
            "in_use_after_load_mib": round(loaded, 1),
            "passes": readings,
        }
        write_json(args.output, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
