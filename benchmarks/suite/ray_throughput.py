"""Corpus throughput, local engine against Ray Data: ``python -m benchmarks.suite.ray_throughput``.

Generates a corpus of short texts (default 100 000; lengths from the stream workload,
log-normal around 28 tokens), saves a random BERT whose exit heads spread the exits
over its layers (the ``Entropy`` threshold that saves about half of them, as in
:mod:`earlyexit_kernels.bench.stream`), then runs the command line on it twice, as a
user would, each in its own process:

- ``python -m earlyexit_kernels classify MODEL corpus.parquet out.parquet`` (local engine);
- the same with ``--engine ray --workers N`` (a local Ray instance started by the command).

It reports wall-clock time and sequences/s of each (process start to exit: imports,
model loading and, for Ray, the cluster's start-up included), Ray's overhead against
the local run, and checks that both wrote the same ``label`` and ``exit_layer`` for every
row. Writes ``ray_throughput_<name>.csv`` / ``.md`` to ``--output-dir`` (default: a new
temporary folder).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from earlyexit_kernels.bench.stream import StreamConfig, calibrate, make_corpus, make_models, sorted_batches

COLUMNS = ["engine", "workers", "rows", "wall_s", "seq_per_s", "vs_local", "mean_exit_layer", "same_as_local"]


def prepare(folder: Path, rows: int, hidden: int, layers: int, seed: int = 0):
    """Write the corpus (Parquet, column ``text``) and the patched model; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from earlyexit_kernels.methods.policies import Entropy
    from earlyexit_kernels.patching.patch import patch

    config = StreamConfig(sequences=rows, hidden=hidden, layers=layers, seed=seed)
    tokenizer, texts, ids = make_corpus(config, folder)
    calibration = min(rows, 2048)  # the threshold is set on the first texts
    _, patched, entropies = make_models(config, tokenizer.vocab_size, sorted_batches(ids[:calibration], 64))
    patch(patched, Entropy(calibrate(entropies, 0.5)))
    model_dir = folder / "model"
    patched.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = folder / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "text": texts}), corpus)
    return model_dir, corpus


def _run(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def _read(path: Path):
    import pyarrow.dataset as ds

    table = ds.dataset(str(path), format="parquet").to_table(columns=["id", "label", "exit_layer"])
    return table.sort_by("id")


def run(rows: int, workers: int, hidden: int, layers: int, output_dir: Path, name: str, progress=print) -> list[dict]:
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        model_dir, corpus = prepare(folder, rows, hidden, layers)
        base = [sys.executable, "-m", "earlyexit_kernels", "classify", str(model_dir), str(corpus)]
        local_out, ray_out = folder / "local.parquet", folder / "ray_out"
        progress(f"{rows} texts, random BERT H={hidden} L={layers}; running the local engine")
        local_s = _run([*base, str(local_out), "--no-progress"])
        progress(f"local: {local_s:.1f} s; running Ray with {workers} workers")
        ray_s = _run([*base, str(ray_out), "--engine", "ray", "--workers", str(workers), "--no-progress"])
        progress(f"ray: {ray_s:.1f} s")
        local, on_ray = _read(local_out), _read(ray_out)
        same = local.column("label").to_pylist() == on_ray.column("label").to_pylist() and (
            local.column("exit_layer").to_pylist() == on_ray.column("exit_layer").to_pylist()
        )
        exits = local.column("exit_layer").to_pylist()
    mean_exit = round(sum(exits) / len(exits), 2)
    table = [
        dict(engine="local", workers=1, rows=rows, wall_s=round(local_s, 1), seq_per_s=round(rows / local_s),
             vs_local="1.00x", mean_exit_layer=mean_exit, same_as_local=True),
        dict(engine="ray", workers=workers, rows=rows, wall_s=round(ray_s, 1), seq_per_s=round(rows / ray_s),
             vs_local=f"{local_s / ray_s:.2f}x", mean_exit_layer=mean_exit, same_as_local=same),
    ]  # fmt: skip
    with open(output_dir / f"ray_throughput_{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    lines = [
        f"{rows} short texts (stream lengths, median 28 tokens), random BERT H = {hidden}, L = {layers}, mean exit "
        f"layer {mean_exit}; the command line end to end (process start to exit) on this {os.cpu_count()}-core "
        "machine.",
        "",
        "| engine | workers | wall s | sequences/s | vs local | same labels and exit layers |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['engine']} | {r['workers']} | {r['wall_s']} | {r['seq_per_s']} | {r['vs_local']} | "
            f"{r['same_as_local']} |"
        )
    overhead = (ray_s - local_s) / local_s
    lines += ["", f"Ray's overhead against the local engine: {100 * overhead:+.0f}% wall-clock time."]
    (output_dir / f"ray_throughput_{name}.md").write_text("\n".join(lines) + "\n")
    if not same:
        raise RuntimeError("the Ray run's labels or exit layers differ from the local run's")
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--name", default="cpu")
    args = parser.parse_args(argv)
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="eek-ray-throughput-"))
    run(args.rows, args.workers, args.hidden, args.layers, output_dir, args.name)
    print((output_dir / f"ray_throughput_{args.name}.md").read_text())
    print(f"written to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
