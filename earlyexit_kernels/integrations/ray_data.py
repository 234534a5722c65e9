"""Early exit on Ray Data: a callable class for ``Dataset.map_batches``, and files in, files out.

    from earlyexit_kernels.integrations.ray_data import EarlyExitClassifier
    ds = ds.map_batches(EarlyExitClassifier, fn_constructor_kwargs={"model": path, "text_column": "text"},
                        concurrency=2, batch_size=4096, batch_format="pandas")

Each actor loads the model once and runs the continuous engine (:func:`eek.classify`)
over every batch Ray hands it, so its layer calls stay full; larger ``batch_size``
values leave fewer partial calls at the end of each batch. Ray is optional: this module
imports it only when used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ClassifierSettings",
    "EarlyExitClassifier",
    "classify_files",
    "input_files",
    "read_dataset",
    "AUDIT_COLUMN",
    "OUTPUT_COLUMNS",
]

OUTPUT_COLUMNS = ("label", "score", "exit_layer", "layers_run", "error")
#: the column an audit adds: each audited row's disagreement with the full model, null elsewhere
AUDIT_COLUMN = "audit_disagreement"
READERS = {
    ".csv": "read_csv",
    ".tsv": "read_csv",
    ".jsonl": "read_json",
    ".json": "read_json",
    ".parquet": "read_parquet",
}


@dataclass(frozen=True)
class ClassifierSettings:
    """The settings of one :class:`EarlyExitClassifier` (its docstring says each), checked once when made: the
    columns (``text_column``, ``pair_column``, ``truncation``), the model (``policy``, ``backend``, ``device``,
    ``dtype``), the engine (``max_batch_size``, ``max_length``, ``compile``) and the audit (``audit_fraction``,
    ``audit_budget``, ``audit_confidence``, ``audit_seed``, ``recertify``). Ray hands the classifier its fields as
    keywords (``fn_constructor_kwargs``), which make one."""

    text_column: str = "text"
    pair_column: str | None = None
    policy: object = None
    max_batch_size: int | None = None  # eek.classify's: 64 on the CPU, the cohorts' token budget on CUDA
    max_length: int | None = None
    backend: str | None = None
    compile: bool = False
    device: str | None = None
    dtype: str | None = None
    truncation: bool = True
    audit_fraction: float = 0.0
    audit_budget: float | None = None
    audit_confidence: float | None = None
    audit_seed: int = 0
    recertify: bool | None = None

    def __post_init__(self) -> None:
        from earlyexit_kernels.engine.entry.audit import audit_config

        # the audit's fields checked by its settings object (AuditConfig), as given
        if audit_config(vars(self)) is None and self.recertify:
            raise ValueError("recertify=True reads the audit: give audit_fraction too")

    def audit(self, model: str):
        """The audit's :class:`~earlyexit_kernels.engine.entry.audit.AuditConfig` for the folder ``model``: the fields as
        given, the budget and confidence not given its certificate's
        (:func:`~earlyexit_kernels.integrations.model_folder.audit_settings`); None without an audit."""
        from earlyexit_kernels.engine.entry.audit import audit_config
        from earlyexit_kernels.integrations.model_folder import audit_settings

        if self.audit_fraction == 0:
            return None
        budget, confidence, source = audit_settings(str(model), self.audit_budget, self.audit_confidence)
        return audit_config(vars(self), budget=budget, confidence=confidence, source=source)


class EarlyExitClassifier:
    """Callable class for ``map_batches``: adds ``label``, ``score``, ``exit_layer``, ``layers_run``, ``error``
    (and ``scores`` for a multi-label model, see :func:`earlyexit_kernels.integrations.labels.labels_and_scores`).
    Its settings: one :class:`ClassifierSettings`, or its fields as keywords (``fn_constructor_kwargs``), not both.

    ``model``: a ``save_pretrained`` directory of a patched model, or a plain Hugging Face
    classifier directory with ``policy`` (an ``eek`` policy or a string such as
    ``"Entropy(0.3)"``); the tokenizer is read from it. ``text_column`` (and
    ``pair_column`` for pairs) hold the texts. ``max_batch_size``, ``max_length``,
    ``compile``: as in :func:`eek.classify`; ``backend`` replaces the saved one.
    ``device``: default ``"auto"``, the GPU when the actor sees one (``num_gpus=1`` in
    ``map_batches``), else the CPU; ``dtype``: the base the layers run in (``"float32"``,
    ``"bfloat16"``, ``"int8"``; default as saved; :func:`earlyexit_kernels.engine.layers.precision.to_base`).
    ``truncation=False`` refuses texts over
    ``max_length`` instead of truncating them.

    ``audit_fraction``: a fraction of the rows, drawn at random (``audit_seed``), that also run
    through the full model (:mod:`earlyexit_kernels.engine.entry.audit`); the result then has one more
    column, ``audit_disagreement``: 1.0 where the full model predicts another class, 0.0 where
    the same (multi-label: the fraction of labels decided otherwise), null where not audited.
    Each actor keeps an :class:`~earlyexit_kernels.engine.entry.audit.AuditWatch` (``self.audit``) over
    every batch it runs, with ``audit_budget`` (a fraction) and ``audit_confidence``, by default
    the certificate's of ``model/eek_fit.json``, and logs its warning; :func:`classify_files` sums
    the column over the whole output. ``recertify`` (None: on where an audit runs on a folder whose
    certificate bounds disagreement; True; False): each actor moves its threshold along the
    folder's certified path from its own audited rows, over every batch it runs
    (``self.certificate``, :mod:`earlyexit_kernels.calibration.online`).

    A null text is classified as the empty string. A row that cannot be classified (a
    value that is not text, or too long without truncation) keeps the job going: its
    outputs are null and ``error`` says why; on every other row ``error`` is null.
    Batches may be pandas DataFrames, pyarrow Tables or dicts of numpy arrays; the
    result has the same form.
    """

    def __init__(self, model, settings: ClassifierSettings | None = None, **fields):
        from earlyexit_kernels.training.fit_config import settings_of

        settings = settings_of(ClassifierSettings, settings, fields, who="EarlyExitClassifier", what="settings")
        policy, recertify = settings.policy, settings.recertify
        from transformers import AutoTokenizer

        from earlyexit_kernels.engine.entry.audit import AuditWatch
        from earlyexit_kernels.integrations.model_folder import to_folder_base
        from earlyexit_kernels.patching.loading import from_pretrained

        audit = settings.audit(model)
        self.audit = None if audit is None else AuditWatch(audit)

        if isinstance(policy, str):
            from earlyexit_kernels.methods.policy_spec import parse_policy

            policy = parse_policy(policy)
        self.model = from_pretrained(model, policy, backend=settings.backend)
        # in the actor: the GPU Ray gave it; int8 with the recipe the folder's int8 certificate holds for
        to_folder_base(model, self.model, settings.dtype, "auto" if settings.device is None else settings.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.certificate = None
        if self.audit is not None:
            from earlyexit_kernels.integrations.labels import is_multi_label
            from earlyexit_kernels.integrations.online_certificate import resolve_online_certificate
            from earlyexit_kernels.patching.patch import policy_of

            self.certificate, _ = resolve_online_certificate(
                str(model),
                policy_of(self.model),
                False if policy is not None else recertify,
                fraction=self.audit.fraction,
                budget=self.audit.budget,
                confidence=self.audit.confidence,
                multi_label=is_multi_label(self.model.config),
            )
        self.text_column, self.pair_column = settings.text_column, settings.pair_column
        self.options = dict(
            max_batch_size=settings.max_batch_size, max_length=settings.max_length, compile=settings.compile
        )
        self.truncation = settings.truncation

    def __call__(self, batch):
        import pandas as pd

        frame, form = _as_pandas(batch)
        for column in (self.text_column, self.pair_column):
            if column is not None and column not in frame.columns:
                raise KeyError(f"no column {column!r} in the batch; its columns are {list(frame.columns)}")
        rows, errors = self._inputs(frame)
        outputs = {name: [None] * len(frame) for name in OUTPUT_COLUMNS}
        outputs["error"] = errors
        from earlyexit_kernels.integrations.labels import is_multi_label

        multi_label = is_multi_label(self.model.config)
        every_label = [None] * len(frame)
        audited = [None] * len(frame)
        if rows:
            from earlyexit_kernels.engine.entry.classify import classify
            from earlyexit_kernels.integrations.labels import label_probabilities, labels_and_scores

            positions, items = zip(*rows)
            predictions = list(
                classify(
                    self.model,
                    items,
                    tokenizer=self.tokenizer,
                    audit=self.audit,
                    recertify=self.certificate or False,
                    **self.options,
                )
            )
            import torch

            logits = torch.stack([p.logits for p in predictions])
            labels, scores = labels_and_scores(logits, self.model.config)
            if multi_label:
                for position, probabilities in zip(positions, label_probabilities(logits, self.model.config)):
                    every_label[position] = json.dumps(probabilities)
            for position, prediction, label, score in zip(positions, predictions, labels, scores):
                outputs["label"][position] = label
                outputs["score"][position] = score
                outputs["exit_layer"][position] = prediction.exit_layer
                outputs["layers_run"][position] = prediction.layers_run
                audited[position] = prediction.disagreement
        result = frame.copy()
        for name in OUTPUT_COLUMNS:
            dtype = {"exit_layer": "Int64", "layers_run": "Int64", "score": "Float64"}.get(name, "string")
            result[name] = pd.array(outputs[name], dtype=dtype)
        if multi_label:  # every label with its probability, as a JSON object per row
            result["scores"] = pd.array(every_label, dtype="string")
        if self.audit is not None:
            result[AUDIT_COLUMN] = pd.array(audited, dtype="Float64")
        return _from_pandas(result, form)

    def _inputs(self, frame) -> tuple[list[tuple[int, object]], list[str | None]]:
        """``(position, text or pair)`` for every row that can be classified, and the error of each row."""
        import pandas as pd

        limit = self.options["max_length"] or self.tokenizer.model_max_length
        errors: list[str | None] = [None] * len(frame)
        rows = []
        texts = frame[self.text_column].tolist()
        pairs = frame[self.pair_column].tolist() if self.pair_column else [None] * len(texts)
        for position, (text, pair) in enumerate(zip(texts, pairs)):
            item = []
            for name, value in ((self.text_column, text), (self.pair_column, pair)):
                if name is None:
                    continue
                if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
                    value = ""
                if not isinstance(value, str):
                    errors[position] = f"{name} is not text ({type(value).__name__})"
                    break
                item.append(value)
            if errors[position] is not None:
                continue
            if not self.truncation:
                count = len(self.tokenizer(*item)["input_ids"])
                if count > limit:
                    errors[position] = f"{count} tokens, over max_length={limit} (truncation is off)"
                    continue
            rows.append((position, item[0] if len(item) == 1 else tuple(item)))
        return rows, errors


def _as_pandas(batch):
    import pandas as pd

    if isinstance(batch, pd.DataFrame):
        return batch, "pandas"
    if isinstance(batch, dict):
        return pd.DataFrame({k: list(v) for k, v in batch.items()}), "numpy"
    return batch.to_pandas(), "pyarrow"


def _from_pandas(frame, form):
    if form == "pandas":
        return frame
    if form == "numpy":
        return {name: frame[name].to_numpy() for name in frame.columns}
    import pyarrow as pa

    return pa.Table.from_pandas(frame, preserve_index=False)


def input_files(path: str) -> tuple[str, list[str]]:
    """The format and the files of ``path`` (a file, or a folder of files of one format); no Ray needed."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    suffixes = {p.suffix.lower() for p in files if p.suffix.lower() in READERS}
    if len(suffixes) != 1:
        raise ValueError(
            f"input {path} must be a .csv, .tsv, .jsonl or .parquet file, or a folder of one of them; "
            f"found {sorted(suffixes) or 'none of them'}"
        )
    suffix = suffixes.pop()
    return suffix, [str(p) for p in files if p.suffix.lower() == suffix]


def read_dataset(path: str):
    """A Ray dataset of ``path``: a file or a folder of CSV, TSV, JSON lines or Parquet files."""
    import ray.data
    from pyarrow import csv as pa_csv

    suffix, paths = input_files(path)
    reader = getattr(ray.data, READERS[suffix])
    if suffix == ".tsv":
        return reader(paths, parse_options=pa_csv.ParseOptions(delimiter="\t"))
    return reader(paths)


def classify_files(
    model: str,
    input_path: str,
    output_path: str,
    *,
    workers: int = 2,
    address: str | None = None,
    batch_size: int = 4096,
    num_gpus: float = 0,
    num_cpus: float | None = None,
    **classifier_kwargs,
) -> dict:
    """Classify ``input_path`` on Ray with ``workers`` actors and write ``output_path``; returns a summary.

    Without ``address`` a local Ray instance is started. ``output_path`` is a folder of
    part files: Parquet, or CSV / JSON lines when its name ends in ``.csv`` / ``.jsonl``.
    Input order is kept. An actor that dies is restarted and its batch run again, so every
    input row is written exactly once. ``num_cpus`` per actor defaults to one, or less
    where the cluster's CPUs could not also run the reading and writing tasks (actors
    holding every CPU would wait forever for their input).

    With ``audit_fraction`` (see :class:`EarlyExitClassifier`) the summary's ``audit`` holds the
    audit over every row written (:meth:`earlyexit_kernels.engine.entry.audit.AuditWatch.as_dict`: the
    rows audited, their disagreements, its rate, its upper bound, the budget), and a warning is
    logged here when the disagreements show the budget passed.
    """
    import ray
    import ray.data

    from earlyexit_kernels.training.fit_config import settings_of

    given = dict(classifier_kwargs)  # the actors' settings, checked here before Ray starts one
    settings = settings_of(
        ClassifierSettings, given.pop("settings", None), given, who="classify_files", what="settings"
    )
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)  # None: a local instance on this machine
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    if num_cpus is None:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        num_cpus = 1.0 if num_gpus else min(1.0, max(0.25, (cpus - 1.0) / workers))
    dataset = read_dataset(input_path)
    classified = dataset.map_batches(
        EarlyExitClassifier,
        fn_constructor_kwargs={"model": model, **classifier_kwargs},
        concurrency=workers,
        batch_size=batch_size,
        batch_format="pandas",
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        max_restarts=-1,  # an actor that dies comes back ...
        max_task_retries=-1,  # ... and its batch runs again
    )
    suffix = Path(output_path).suffix.lower()
    writer = {".csv": "write_csv", ".jsonl": "write_json"}.get(suffix, "write_parquet")
    getattr(classified, writer)(output_path)
    auditing = bool(settings.audit_fraction)
    written = _read_written(output_path, writer, ["error", AUDIT_COLUMN] if auditing else ["error"])
    summary = {"rows": len(written), "errors": int(written["error"].notna().sum()), "output": output_path}
    if auditing:
        summary["audit"] = _audit_summary(written[AUDIT_COLUMN], model, settings)
    return summary


def _audit_summary(column, model: str, settings: ClassifierSettings) -> dict:
    """The audit over every written row: one watch fed the column's values (it warns here, once, where due)."""
    from earlyexit_kernels.engine.entry.audit import AuditWatch

    watch = AuditWatch(settings.audit(model))
    watch.record(float(v) for v in column.dropna())
    return watch.as_dict()


def _read_written(output_path: str, writer: str, columns: list[str]):
    import pandas as pd

    parts = sorted(p for p in Path(output_path).iterdir() if p.is_file() and not p.name.startswith("."))
    if writer == "write_parquet":
        return pd.concat([pd.read_parquet(p, columns=columns) for p in parts], ignore_index=True)
    if writer == "write_csv":
        return pd.concat([pd.read_csv(p, usecols=columns) for p in parts], ignore_index=True)
    return pd.concat([pd.read_json(p, lines=True) for p in parts], ignore_index=True)
