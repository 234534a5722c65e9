"""OpenVINO static int8 beside the servers: the plain classifier quantized by NNCF, its batches timed in this process.

Infinity (0.0.78) serves ONNX Runtime and PyTorch, not OpenVINO, so the serving benchmark compares
OpenVINO's int8, the fastest int8 runtime on Intel CPUs in Sentence Transformers' documentation, per
batch in the same run (issue 95): the plain classifier (the weights Infinity serves) exported to ONNX,
quantized by NNCF's ``quantize`` with the transformer preset on ``calibration`` texts (the validation
split: never the texts timed), compiled with the servers' thread count, and run on the corpus job's
texts in the same order, in batches of the corpus job's size, pinned to the server cores. Each batch's
time runs from its texts to its labels (tokenization included, as a server's would), with no HTTP and
no queue: a floor under what an OpenVINO server would take, to read beside the corpus job's rows.

    row = measure(plain, texts, calibration, full_labels, batch=32, threads=1, cores=(0,))

Needs ``openvino``, ``nncf`` and ``onnx`` (bench-only, never a dependency of the package);
:func:`missing` says which are absent.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

__all__ = ["NAME", "missing", "measure"]

#: the row's server name
NAME = "openvino int8 (per batch, in process)"


def missing() -> str | None:
    """Why the peer cannot run here (the packages absent), or None."""
    absent = [name for name in ("openvino", "nncf", "onnx") if importlib.util.find_spec(name) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def measure(
    plain: Path, texts: list[str], calibration: list[str], full: list[str], *, batch: int, threads: int, cores
) -> tuple[dict, str]:
    """``(row, note)``: the corpus job's row of OpenVINO static int8 (every text once, in batches of ``batch``) and
    what ran; ``full``: the full model's label of each text, for the agreement."""
    import openvino
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.suite.serve_drive import Drive, pinned, summarize
    from benchmarks.suite.stack_peers import export_onnx, openvino_int8

    tokenizer = AutoTokenizer.from_pretrained(plain)
    model = AutoModelForSequenceClassification.from_pretrained(plain, dtype=torch.float32).eval()
    limit = model.config.max_position_embeddings
    names = model.config.id2label

    def encode(chunk: list[str]) -> dict:
        return dict(tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"))

    calibration_batches = [encode(calibration[s : s + batch]) for s in range(0, len(calibration), batch)]
    with tempfile.TemporaryDirectory(prefix="eek-openvino-peer-") as folder:
        exported = export_onnx(model, calibration_batches[0], Path(folder))
        config, setting = openvino_int8(openvino.Core(), exported, calibration_batches, threads)
        run = config.run
        drive = Drive()
        with pinned(cores):
            run(encode(texts[:batch]))  # warm-up: the first inference compiles its shapes
            started = time.perf_counter()
            for start in range(0, len(texts), batch):
                sent = time.perf_counter()
                logits, _ = run(encode(texts[start : start + batch]))
                drive.latency.append(time.perf_counter() - sent)
                drive.index += list(range(start, min(start + batch, len(texts))))
                drive.label += [names[int(i)] for i in logits.argmax(-1)]
            drive.wall = time.perf_counter() - started
    row = summarize(NAME, 1, drive, full, batch)
    note = (
        f"openvino {openvino.__version__}, nncf {_version('nncf')}: static int8, "
        f"nncf.quantize(model_type=TRANSFORMER) on {len(calibration)} calibration texts, {threads} thread(s), "
        f"{setting}; batches timed in the benchmark's process, no HTTP"
    )
    return row, note


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)
