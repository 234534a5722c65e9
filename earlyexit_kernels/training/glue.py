"""GLUE tasks from local files (SST-2, MRPC, RTE, MNLI, STS-B), tokenized for a patched model.

Nothing is downloaded: give the path of a local CSV, TSV, JSON (lines) or Parquet file
in GLUE's layout, read with the ``datasets`` library (``pip install datasets``):

    ds = load_glue("sst2", "SST-2/dev.tsv", tokenizer, max_length=128)
    batches = glue_batches(ds, tokenizer, batch_size=32)    # for train_exit_heads / calibrate

Column names: those of the Hugging Face ``glue`` dataset (``sentence``; ``sentence1``,
``sentence2``; ``premise``, ``hypothesis``; ``label``) and those of the original GLUE
TSV files (MRPC's ``#1 String``, ``#2 String``, ``Quality``; MNLI's ``gold_label``;
STS-B's ``score``) are both recognised. Text labels (``entailment``, ...) are mapped to
the Hugging Face ids; STS-B is a regression (``num_labels == 1``, float labels).
TSV files are read without quote processing, as GLUE's files need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["GlueTask", "GLUE_TASKS", "load_glue", "glue_batches"]


@dataclass(frozen=True)
class GlueTask:
    """Where a task's text and label live, and its labels."""

    name: str
    text_columns: tuple[tuple[str, ...], ...]  # per text field: the accepted column names, first found wins
    label_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", (("sentence",),), ("label",), ("negative", "positive")),
    "mrpc": GlueTask(
        "mrpc",
        (("sentence1", "#1 String"), ("sentence2", "#2 String")),
        ("label", "Quality"),
        ("not_equivalent", "equivalent"),
    ),
    "rte": GlueTask("rte", (("sentence1",), ("sentence2",)), ("label",), ("entailment", "not_entailment")),
    "mnli": GlueTask(
        "mnli",
        (("premise", "sentence1"), ("hypothesis", "sentence2")),
        ("label", "gold_label"),
        ("entailment", "neutral", "contradiction"),
    ),
    "stsb": GlueTask("stsb", (("sentence1",), ("sentence2",)), ("label", "score"), None),
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb"}
_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _datasets():
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "the GLUE loaders read local files with the `datasets` library: pip install datasets"
        ) from err
    return datasets


def _task(name: str) -> GlueTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _read(path: str, file_format: str | None):
    datasets = _datasets()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    extension = os.path.splitext(path)[1].lower()
    kind = file_format or _FORMATS.get(extension)
    if kind is None:
        raise ValueError(f"cannot tell the format of {path}; pass file_format='csv', 'tsv', 'json' or 'parquet'")
    kwargs = {}
    if kind == "tsv" or (kind == "csv" and extension == ".tsv"):
        kind = "csv"
        kwargs = {"sep": "\t", "quoting": 3, "keep_default_na": False}  # 3 = csv.QUOTE_NONE
    elif kind == "csv":
        kwargs = {"keep_default_na": False}
    return datasets.load_dataset(kind, data_files=path, split="train", **kwargs)


def _pick(columns, candidates: tuple[str, ...], what: str, path: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"{path}: no {what} column; expected one of {', '.join(candidates)}, found {', '.join(columns)}")


def _label_value(task: GlueTask, value):
    if task.is_regression:
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text in task.label_names:
            return task.label_names.index(text)
        value = int(text)  # "0" / "1" in CSV files
    value = int(value)
    if not 0 <= value < task.num_labels:
        raise ValueError(f"{task.name}: label {value} outside 0..{task.num_labels - 1}")
    return value


def load_glue(
    task: str,
    path: str,
    tokenizer,
    *,
    max_length: int = 128,
    file_format: str | None = None,
    with_labels: bool = True,
):
    """A tokenized ``datasets.Dataset`` of a GLUE task read from a local file.

    ``task``: ``"sst2"``, ``"mrpc"``, ``"rte"``, ``"mnli"`` or ``"stsb"``. ``path``: a
    ``.csv``, ``.tsv``, ``.json``/``.jsonl`` or ``.parquet`` file (or name the format with
    ``file_format``). ``tokenizer``: any Hugging Face tokenizer; sequences are truncated
    to ``max_length`` and not padded (see :func:`glue_batches`). The result has
    ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer gives
    them) and, with ``with_labels``, ``labels`` (int, or float for STS-B); rows whose
    label is missing or ``-`` (MNLI's unlabelled pairs) are dropped. Raises
    ``ImportError`` naming the package when ``datasets`` is missing.
    """
    spec = _task(task)
    raw = _read(path, file_format)
    columns = raw.column_names
    text_columns = [_pick(columns, names, "text", path) for names in spec.text_columns]
    label_column = _pick(columns, spec.label_columns, "label", path) if with_labels else None
    if label_column is not None:
        raw = raw.filter(lambda row: row[label_column] is not None and str(row[label_column]).strip() not in ("", "-"))

    def encode(rows):
        texts = [[str(t) for t in rows[c]] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        if label_column is not None:
            encoded["labels"] = [_label_value(spec, v) for v in rows[label_column]]
        return dict(encoded)

    dataset = raw.map(encode, batched=True, remove_columns=columns)
    if label_column is not None and spec.is_regression:
        from datasets import Value

        dataset = dataset.cast_column("labels", Value("float32"))
    return dataset


def glue_batches(dataset, tokenizer, *, batch_size: int = 32, shuffle_seed: int | None = None) -> list[dict]:
    """Padded batches (dicts of tensors) of a :func:`load_glue` dataset, for
    :func:`~earlyexit_kernels.training.train.train_exit_heads` and the calibration."""
    order = list(range(len(dataset)))
    if shuffle_seed is not None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    out = []
    for start in range(0, len(order), batch_size):
        rows = dataset.select(order[start : start + batch_size])
        features = [dict(row) for row in rows]
        labels = [f.pop("labels") for f in features] if "labels" in rows.column_names else None
        batch = dict(tokenizer.pad(features, return_tensors="pt"))
        if labels is not None:
            dtype = torch.float32 if isinstance(labels[0], float) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        out.append(batch)
    return out
