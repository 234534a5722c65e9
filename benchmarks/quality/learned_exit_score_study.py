"""Would a learned exit score certify fewer layers than ``eek fit``'s default? An offline study (issue 108).

(Past 600 lines: one study read top to bottom, its fit and records, the scores, their certificates and the report; a
sixth of it is this docstring's committed commands.)

On MiniLM-L6 fine-tuned on Rotten Tomatoes (``.cache/demo/model``, ``make demo``'s export, with
``.cache/demo/train.csv``, ``validation.csv`` and ``test.csv``), as ``eek fit MODEL train.csv FOLDER
--calibration validation.csv`` does it: :func:`~earlyexit_kernels.training.fit_texts.fit_model` with ``eek
fit``'s defaults (heads recipe, pooling and form ``auto``, 1 point of accuracy lost, 95%, the paired exact test,
``--validation-split 0.1`` of train.csv held out as the validation rows, seed 0). Then every head's logits and
the mean-pooled hidden state of every layer are recorded on four sets of rows: the heads' training rows (train.csv
less the held-out tenth), the validation rows (that tenth), the calibration rows (validation.csv) and the test
rows (test.csv).

The scores compared, per internal layer ``k`` (the last layer always exits):

- ``default``: what ``eek fit`` certified (its heads' entropy along the path it chose); ``default recertified
  here``: the same record put through this script's own ``certify`` call, a check that the call is the fit's;
- ``logistic``: a logistic regression per layer, and ``mlp``: an MLP of 16 hidden units per layer (scikit-learn),
  each predicting whether layer ``k``'s class equals the full model's, from the features of issue 108: the head's
  top probability, margin and entropy; whether its class is layer ``k - 1``'s and for how many layers in a row it
  has been; the total-variation distance of its distribution from layer ``k - 1``'s; the cosine of the
  mean-pooled hidden state to layer ``k - 1``'s (layer 1: to the embeddings'). Trained on the heads' training
  rows only, target agreement with the full model (no gold label read); never on the calibration or test rows.

How a learned score is certified with the package's own machinery, unchanged. The certificate walks ``Entropy``
policies, which threshold each head's entropy per layer. For each row and internal layer a surrogate head is
written whose class is the real head's class and whose logits are ``m`` for that class and 0 for the others,
``m = softplus(u) + 0.01`` (clipped at 60), ``u`` the learned score's log-odds: its entropy falls strictly as the
score rises, so ``Entropy`` thresholds on the surrogate are thresholds on the learned score, one per layer, and
the class served at an exit (hence every row's loss) is the real head's. The last layer keeps the full model's
logits. That record goes to :func:`earlyexit_kernels.calibration.certify.certify` exactly as ``eek fit``'s
calibration calls it (risk accuracy lost, budget 1 point, confidence 95%, the path chosen by
:func:`~earlyexit_kernels.calibration.candidates.choose_path` on the validation rows, certified on the
calibration rows; ``order_seed`` fixed to 0, which the paired exact test does not read). The policy certified is
replayed on the test rows' surrogate record: mean layers and accuracy lost (points, against the full model).

``--hidden-probe`` adds two scores that also read the layer's mean-pooled hidden state itself (H inputs beside
the features), as BERxiT's learning-to-exit module reads the layer's hidden state: ``probe``, a logistic
regression whose L2 penalty is chosen among :data:`PROBE_CS` by 5-fold log loss on the heads' training rows, and
``probe_mlp``, an MLP of 16 hidden units (early stopping on a tenth of those rows). Trained, certified and measured
as the others. The states are recorded once per task source (``pooled*.pt`` in ``--cache``). The committed runs:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --task-source benchmark \\
        --hidden-probe --threads 2 --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_benchmark_probe_cpu.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --task-source benchmark \\
        --backbone mpnet --threads 2 --from-folder .cache/mpnet-rt-99bf4a38db09-eekfit --hidden-probe \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_mpnet_probe_cpu.json

``--score-rows validation`` trains the learned scores on the validation rows instead, which the heads never saw (and
which choose the path: a score that learns them is chosen on its own training rows):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --task-source benchmark \\
        --hidden-probe --score-rows validation \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_benchmark_validation_rows_cpu.json

``--length`` adds each text's log length in tokens as an eighth feature (records made before it lack the lengths and
are refused); the committed run (``make demo``'s source, so it fits and records afresh):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --threads 2 --length \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_length_cpu.json

``--oracle-blend W ...`` certifies, beside them, scores read from the truth (not servable): each layer's entropy as
log-odds of agreement (a logistic regression on it alone), pushed ``W`` of its standard deviations towards each row's
own agreement; how good a score would have to be for a target. The committed run (from the ``--length`` run's cache):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --threads 2 \\
        --oracle-blend 0 0.1 0.2 0.3 0.4 0.6 1 \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_oracle_blend_cpu.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --task-source benchmark \\
        --backbone mpnet --threads 2 --oracle-blend 0 0.1 0.2 0.3 0.4 0.6 1 \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_mpnet_oracle_blend_cpu.json

Also on test: ``path oracle`` (the fewest mean layers of the score's certified path whose test loss is within
the budget), the per-row oracle (the first layer from which every head agrees with the final classifier), and
each score's ROC AUC per layer for predicting agreement (the default's: minus the head's entropy), and each
feature's alone.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/quality/learned_exit_score_study.py \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_cpu.json

``--task-source benchmark`` runs it instead on exactly the model, rows and fit of
``benchmarks/quality/certified_exits_real.py``'s MiniLM-L6 Rotten Tomatoes row ``train + validation file`` (issue
108's first target): the classifier fine-tuned on the task's train split (cached under ``.cache``, ``minilm-rt-*``),
the train split as TRAIN_FILE (its held-out tenth the validation rows, the rest the heads' training rows), the
validation split as ``--calibration``, the test split measured, read and fitted as that script's ``--setting 'train
+ validation file'`` does it:

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/quality/learned_exit_score_study.py \\
        --task-source benchmark --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_benchmark_cpu.json

Measured on the AMD EPYC (2026-11-29), its ``default`` row equals that ``--setting`` row fitted again at the same
commit: the same policy, 2.78 of 6 on test, path oracle 2.17, per-row oracle 1.69. That is not the 2.43 / 2.16 /
1.70 issue 108 quotes, which ``--from-folder`` read from an ``eek fit`` folder written earlier
(``bench-results/serve-peers/eek-minilm-rt``, not kept) whose heads differ: its per-row oracle, which reads only the
heads, is 1.6996 against 1.6856 here. ``make demo``'s model is that same classifier (hard-linked) and its csv files
the same texts (labels by name), so both sources gave the same figures.

``--backbone mpnet`` (with ``--task-source benchmark``) runs it on that script's MPNet-base row instead (12 layers,
fine-tuned first where the cache lacks it; ``--threads 2`` where the machine is free). ``--from-folder FOLDER`` reads
the fit ``eek fit`` wrote on the row's classifier and rows (``make demo``'s csv files are the task's splits, row for
row) instead of fitting again; the committed MPNet-base run:

    .venv/bin/eek fit .cache/mpnet-rt-99bf4a38db09 .cache/demo/train.csv .cache/mpnet-rt-99bf4a38db09-eekfit \\
        --calibration .cache/demo/validation.csv --threads 1
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --task-source benchmark \\
        --backbone mpnet --threads 2 --from-folder .cache/mpnet-rt-99bf4a38db09-eekfit \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_mpnet_cpu.json

``--setting '6,000 fine-tuning rows + validation file'`` (with ``--task-source benchmark``) reads that script's row of
the same name instead (issue 108's second target): the classifier fine-tuned on the train split's first 6,000 rows
only (cached as ``minilm-rt-first6000-*``, fine-tuned first where missing), those rows the fit's TRAIN_FILE, the
validation split ``--calibration``; the committed run:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quality/learned_exit_score_study.py --task-source benchmark \\
        --setting '6,000 fine-tuning rows + validation file' --threads 2 \\
        --output benchmarks/results/amd_epyc/learned_exit_score_study_rt_first6000_cpu.json

The fit and the records are cached in ``--cache`` (default ``/tmp/learned_score_cache``; one file per task source
and seed); a rerun only trains the scores and certifies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import numpy as np
import torch

import earlyexit_kernels as eek
from benchmarks.quality.certified_exits_real import (
    BUDGET_POINTS,
    CONFIDENCE,
    FINE_TUNING_ROWS,
    SUBSET_SETTINGS,
    _oracle,
    fit_as_eek_fit,
    per_row_oracle,
    saved_fit,
)
from benchmarks.suite.script_results import run_conditions, write_json
from earlyexit_kernels.calibration.candidates import describe
from earlyexit_kernels.calibration.certify import certify
from earlyexit_kernels.calibration.record import ExitRecord, replay
from earlyexit_kernels.calibration.row_losses import row_losses
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.methods.policy_spec import parse_policy
from earlyexit_kernels.training.labelled_texts import encode, label_ids, length_sorted_batches, split_rows

SCRIPT = "benchmarks/quality/learned_exit_score_study.py"
DEMO = Path(__file__).resolve().parents[2] / ".cache" / "demo"
SPLITS = ("heads_train", "validation", "calibration", "test")
FEATURES = ("top_prob", "margin", "entropy", "agrees_prev", "agree_run", "moved_tv", "hidden_cosine")
MAX_LENGTH = 128
#: ``--hidden-probe``: the logistic probe's inverse penalties tried
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0)
#: ``--task-source benchmark``: the row of ``certified_exits_real.py`` measured (``--backbone``: its backbone,
#: ``--setting``: its setting)
BENCHMARK_TASK, BENCHMARK_SETTING = "rotten_tomatoes", "train + validation file"
#: the settings of that script the study reads: its classifier fine-tuned on the whole train split, or on its first
#: 6,000 rows only (TRAIN_FILE then those rows: issue 108's second target)
BENCHMARK_SETTINGS = (BENCHMARK_SETTING, SUBSET_SETTINGS[0])


@dataclass(frozen=True)
class TaskRow:
    """Whose model and rows the study reads: ``source`` ``demo`` (``make demo``'s) or ``benchmark`` (the row of
    ``certified_exits_real.py`` of ``backbone`` and ``setting``)."""

    source: str = "demo"
    backbone: str = "minilm"
    setting: str = BENCHMARK_SETTING

    @property
    def fine_tuning_rows(self) -> int | None:
        """The train rows the classifier was fine-tuned on and the fit reads (None: the whole train split)."""
        return FINE_TUNING_ROWS if self.setting in SUBSET_SETTINGS else None


# ------------------------------------------------------------------------------------------ the fit and records


@torch.no_grad()
def _pooled(encoder, batches) -> torch.Tensor:
    """[L + 1, N, H]: each layer's mean-pooled hidden state (0: the embeddings'), the rows in the batches' order."""
    out = []
    for batch in batches:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        states = encoder(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch.get("token_type_ids"),
            output_hidden_states=True,
        ).hidden_states
        out.append(torch.stack([(h * mask).sum(1) / mask.sum(1) for h in states]))
    return torch.cat(out, 1)


def _cosines(pooled: torch.Tensor) -> torch.Tensor:
    """[L, N]: cosine of each layer's mean-pooled hidden state to the layer below's (layer 1: the embeddings')."""
    return torch.nn.functional.cosine_similarity(pooled[1:], pooled[:-1], dim=-1)


def _demo_task():
    """``make demo``'s export and its csv files: the model, its tokenizer, its folder, the three files, and no
    extra columns for the result."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from earlyexit_kernels.integrations.table_io import read_labelled

    model_dir = DEMO / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    files = [read_labelled(str(DEMO / name)) for name in ("train.csv", "validation.csv", "test.csv")]
    return model, tokenizer, model_dir, *files, {}


def _benchmark_task(row: TaskRow):
    """``certified_exits_real.py``'s Rotten Tomatoes row of ``row.backbone`` (``minilm``, ``mpnet``) and
    ``row.setting``: the classifier fine-tuned on the train split (cached, ``make demo``'s recipe), or on its first
    6,000 rows, those rows as TRAIN_FILE, the validation split as ``--calibration``, the test split measured, read as
    that script reads them."""
    from benchmarks.quality.certified_exits_real import _rows
    from earlyexit_kernels.demo import real_task

    subset = row.fine_tuning_rows
    model, tokenizer, info = real_task.fine_tuned_model(
        row.backbone, task=BENCHMARK_TASK, progress="lines", train_rows=subset
    )
    splits = real_task.load_task(BENCHMARK_TASK)
    seen, _ = real_task.train_subset(splits["train"], subset)
    files = [
        _rows(seen, "train split" if subset is None else f"first {subset:,} train rows"),
        _rows(splits["validation"], "validation split"),
        _rows(splits["test"], "test split"),
    ]
    extra = {
        "backbone": row.backbone,
        "task": BENCHMARK_TASK,
        "setting": row.setting,
        "fine_tuned": Path(info["path"]).name,
    }
    return model, tokenizer, Path(info["path"]), *files, extra


def _task(row: TaskRow, seed: int) -> tuple:
    """``(model, tokenizer, model_dir, rows of each of SPLITS, extra)`` of ``row`` (source ``demo``:
    :func:`_demo_task`; ``benchmark``: :func:`_benchmark_task`); the validation rows are the held-out tenth of
    TRAIN_FILE, drawn as ``eek fit``'s ``--validation-split 0.1`` draws them."""
    model, tokenizer, model_dir, train_file, calibration, test, extra = (
        _demo_task() if row.source == "demo" else _benchmark_task(row)
    )
    rest, held = split_rows(len(train_file), 0.1, seed)
    return model, tokenizer, model_dir, (train_file.subset(rest), train_file.subset(held), calibration, test), extra


def _cache_name(row: TaskRow) -> str:
    """The part of a cache file's name that says its task source (the MiniLM-L6 benchmark's whole-train row keeps
    the name it had before there was a choice of backbone or setting)."""
    if row.source == "demo":
        return ""
    backbone = "" if row.backbone == "minilm" else f"_{row.backbone}"
    subset = "" if row.fine_tuning_rows is None else f"_first{row.fine_tuning_rows}"
    return f"_{row.source}{backbone}{subset}"


def _fit_fields(report: dict) -> dict:
    """What the study keeps of a fit's report: ``FitReport.as_dict()`` of a fit it ran, or the report an ``eek fit``
    folder saved (``eek_fit.json``), which holds the same fields."""
    return {
        "heads": f"{report.get('pooling')}, {report.get('head')}",
        "policy": report["policy"],
        "train_rows": report["train_rows"],
        "validation_rows": report.get("validation_rows"),
        "calibration_rows": report["calibration_rows"],
        "certificate": report.get("certificate") or {},
        "certified_layers_calibration": report["mean_layers"],
        "certified_path": report.get("certified_path") or [],
    }


def _folder_fit(folder: Path, model_dir: Path) -> tuple:
    """``(patched model, report fields)`` of the fit ``eek fit MODEL train.csv FOLDER --calibration
    validation.csv`` already wrote (``--from-folder``), as :func:`_fit_fields` gives them; refused unless MODEL was
    ``model_dir``'s classifier (the row's)."""
    saved = saved_fit(folder)
    if Path(saved.source_model or "").name != model_dir.name:
        raise SystemExit(
            f"error: {folder} was fitted on {saved.source_model}, not on the row's classifier {model_dir}: "
            "give --backbone the folder's backbone, or a folder fitted on that classifier"
        )
    report = saved.report
    fields = {
        "seconds": round(report["train_seconds"] + report["calibrate_seconds"], 1),
        **_fit_fields(report),
        "folder": str(folder),
    }
    return eek.from_pretrained(str(folder)).eval(), fields


def fit_and_record(seed: int, cache: Path, row: TaskRow = TaskRow(), folder: Path | None = None) -> dict:
    """``eek fit``'s defaults on ``row``'s model and rows (source ``demo``: :func:`_demo_task`; ``benchmark``:
    :func:`_benchmark_task`), then every split's record; cached in ``cache``. ``folder``: the fit an ``eek fit``
    run on the same rows wrote there, read instead of fitting again."""
    # a folder's records are its own (another fit's heads give other records)
    name = _cache_name(row) + ("" if folder is None else f"_from_{Path(folder).resolve().name}")
    target = cache / f"records{name}_seed{seed}.pt"
    if target.is_file():
        return {**torch.load(target, weights_only=False), "from_cache": str(target)}
    from transformers import AutoModel

    from earlyexit_kernels.training.calibrate_model import record_exits

    model, tokenizer, model_dir, (train, validation, calibration, test), extra = _task(row, seed)
    started = time.perf_counter()
    if folder is not None:
        model, fields = _folder_fit(folder, model_dir)
    else:
        fields = _fit_fields(fit_as_eek_fit(model, tokenizer, train, validation, calibration, seed).as_dict())
    certificate = fields.pop("certificate")
    fit_seconds = time.perf_counter() - started
    encoder = AutoModel.from_pretrained(model_dir).eval()  # the same backbone, unpatched: its hidden states
    records = {}
    for name, batches in _split_batches(model, tokenizer, (train, validation, calibration, test)):
        record = record_exits(model, batches)
        cosines = _cosines(_pooled(encoder, batches))
        assert torch.equal(record.labels, torch.cat([b["labels"] for b in batches]))
        tokens = torch.cat([b["attention_mask"].sum(-1) for b in batches])  # each row's length, for --length
        records[name] = {
            "logits": record.all_logits.float(),
            "labels": record.labels,
            "cosines": cosines,
            "tokens": tokens,
        }
        print(f"recorded {name}: {record.all_logits.shape[1]} rows", flush=True)
    certified_path = fields.pop("certified_path")
    result = {
        "records": records,
        "policy": describe(eek.policy_of(model), None),
        "certified_path": certified_path,
        "fit": {
            **extra,
            "seconds": fields.pop("seconds", round(fit_seconds, 1)),
            **fields,
            "path": certificate.get("path"),
            "path_layers_validation": certificate.get("path_layers"),
            "bound": certificate.get("bound"),
        },
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(result, target)
    return result


def _split_batches(model, tokenizer, splits) -> list:
    """``(name, batches)`` of each of :data:`SPLITS`' rows, length-sorted as the records read them."""
    out = []
    for name, rows in zip(SPLITS, splits, strict=True):
        ids = label_ids(rows, model.config)
        out.append((name, list(length_sorted_batches(encode(tokenizer, rows, MAX_LENGTH), ids, 64))))
    return out


def pooled_states(seed: int, cache: Path, row: TaskRow, records: dict) -> dict[str, torch.Tensor]:
    """``--hidden-probe``: each split's [L + 1, N, H] mean-pooled hidden states (float16), the rows in ``records``'
    order (checked: their cosines are the records'); cached beside the records. They do not depend on the fit."""
    target = cache / f"pooled{_cache_name(row)}_seed{seed}.pt"
    if target.is_file():
        pooled = torch.load(target, weights_only=False)
    else:
        from transformers import AutoModel

        model, tokenizer, model_dir, splits, _ = _task(row, seed)
        encoder = AutoModel.from_pretrained(model_dir).eval()
        pooled = {name: _pooled(encoder, batches).half() for name, batches in _split_batches(model, tokenizer, splits)}
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(pooled, target)
    for name, states in pooled.items():
        gap = (_cosines(states.float()) - records[name]["cosines"]).abs().max()
        if gap > 1e-2:  # float16 states: cosines within about 1e-3 of the records' float32 ones
            raise SystemExit(f"error: {target}'s {name} rows are not the records' (cosines apart by {gap:.3g})")
    return pooled


# ------------------------------------------------------------------------------------------ features and scores


def features(logits: torch.Tensor, cosines: torch.Tensor) -> np.ndarray:
    """[L, N, F] float64: the features of :data:`FEATURES` for each layer and row."""
    probs = torch.softmax(logits.double(), -1)
    top2 = probs.topk(2, -1).values
    entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)
    classes = probs.argmax(-1)
    agrees = torch.zeros_like(classes, dtype=torch.float64)
    agrees[1:] = (classes[1:] == classes[:-1]).double()
    run = torch.zeros_like(agrees)
    for k in range(1, len(run)):
        run[k] = (run[k - 1] + 1) * agrees[k]
    moved = torch.zeros_like(agrees)
    moved[1:] = 0.5 * (probs[1:] - probs[:-1]).abs().sum(-1)
    stacked = [top2[..., 0], top2[..., 0] - top2[..., 1], entropy, agrees, run, moved, cosines.double()]
    return torch.stack(stacked, -1).numpy()


def with_log_tokens(x: np.ndarray, tokens: torch.Tensor) -> np.ndarray:
    """``x`` ([L, N, F]) with each row's log length in tokens as one more feature at every layer."""
    column = np.broadcast_to(np.log(tokens.double().numpy())[None, :, None], (*x.shape[:2], 1))
    return np.concatenate([x, column], -1)


def agreement(logits: torch.Tensor) -> np.ndarray:
    """[L, N] int: each layer's class is the full model's (the last layer's)."""
    classes = logits.argmax(-1)
    return (classes == classes[-1]).int().numpy()


def make_model(kind: str, seed: int):
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    if kind == "probe":  # hundreds of inputs: the L2 penalty chosen by 5-fold log loss on the training rows
        return make_pipeline(
            StandardScaler(), LogisticRegressionCV(Cs=PROBE_CS, cv=5, scoring="neg_log_loss", max_iter=2000)
        )
    if kind == "probe_mlp":
        return make_pipeline(
            StandardScaler(),
            MLPClassifier(hidden_layer_sizes=(16,), alpha=1e-2, early_stopping=True, max_iter=500, random_state=seed),
        )
    return make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(16,), alpha=1e-3, max_iter=1000, early_stopping=False, random_state=seed),
    )


class LearnedScore:
    """One small model per internal layer, trained on the heads' training rows to predict agreement."""

    def __init__(self, kind: str, seed: int):
        self.kind, self.seed, self.models = kind, seed, []

    def fit(self, x: np.ndarray, y: np.ndarray) -> LearnedScore:
        for k in range(x.shape[0] - 1):
            if y[k].min() == y[k].max():  # one class only: a constant score
                self.models.append(float(y[k][0]))
            else:
                self.models.append(make_model(self.kind, self.seed).fit(x[k], y[k]))
        return self

    def log_odds(self, x: np.ndarray) -> np.ndarray:
        """[L - 1, N]: the score's log-odds of agreement at each internal layer."""
        out = []
        for k, model in enumerate(self.models):
            if isinstance(model, float):
                out.append(np.full(x.shape[1], 30.0 if model else -30.0))
            else:
                p = model.predict_proba(x[k])[:, 1].clip(1e-12, 1 - 1e-12)
                out.append(np.log(p) - np.log1p(-p))
        return np.stack(out)


def surrogate(logits: torch.Tensor, labels: torch.Tensor, log_odds: np.ndarray, policy) -> ExitRecord:
    """The record whose internal heads keep their class and whose entropy falls as the learned score rises."""
    num_layers, rows, num_labels = logits.shape
    out = logits.clone().float()
    m = torch.nn.functional.softplus(torch.as_tensor(log_odds, dtype=torch.float64)) + 0.01
    m = m.clamp(max=60.0).float()
    classes = logits[:-1].argmax(-1)
    inner = torch.zeros(num_layers - 1, rows, num_labels)
    inner.scatter_(-1, classes.unsqueeze(-1), m.unsqueeze(-1))
    out[:-1] = inner
    assert torch.equal(out[:-1].argmax(-1), classes)
    return ExitRecord(out, labels, None, None, policy)


def record_of(split: dict, policy) -> ExitRecord:
    return ExitRecord(split["logits"], split["labels"], None, None, policy)


# ------------------------------------------------------------------------------------------ measuring


def on_test(policy, path, record: ExitRecord) -> dict:
    out = replay(policy, record)
    losses = row_losses(out.logits, record, "accuracy").double()
    return {
        "certified_test_layers": out.layers_run.float().mean().item(),
        "certified_test_loss_points": 100 * float(losses.mean()),
        "certified_test_loss_se_points": 100 * float(losses.std() / losses.numel() ** 0.5),
        "path_oracle_test_layers": _oracle(path, record, BUDGET_POINTS / 100),
    }


def aucs(scores: np.ndarray, y: np.ndarray) -> list[float | None]:
    from sklearn.metrics import roc_auc_score

    return [
        None if y[k].min() == y[k].max() else round(float(roc_auc_score(y[k], scores[k])), 4)
        for k in range(scores.shape[0])
    ]


def certified_score(records: dict, odds: dict, family, test_agreement: np.ndarray) -> dict:
    """A score's row: ``odds`` (each of the validation, calibration and test splits' [L - 1, N] log-odds of
    agreement) certified through the surrogate records as ``eek fit`` certifies (path on the validation rows,
    certificate on the calibration rows), then replayed on the test rows, with its test AUC per layer."""
    made = {
        name: surrogate(records[name]["logits"], records[name]["labels"], odds[name], family)
        for name in ("validation", "calibration", "test")
    }
    chosen, certificate, path = certified(made["calibration"], made["validation"], family)
    return {
        "policy": describe(chosen.policy, 4),
        "path": certificate.path,
        "path_layers_validation": certificate.path_layers,
        "certified_layers_calibration": certificate.mean_layers,
        "bound": certificate.bound,
        **on_test(chosen.policy, path, made["test"]),
        "test_auc_per_layer": aucs(odds["test"], test_agreement[:-1]),
    }


def certified(cal: ExitRecord, path_record: ExitRecord, family) -> tuple:
    chosen, certificate, walked = certify(
        cal,
        BUDGET_POINTS / 100,
        CONFIDENCE,
        target="accuracy",
        policy=family,
        path_record=path_record,
        order_seed=0,
    )
    return chosen, certificate, [point.policy for point in walked]


def run(
    seed: int,
    cache: Path,
    row: TaskRow = TaskRow(),
    folder: Path | None = None,
    hidden_probe: bool = False,
    score_rows: str = "heads_train",
    length: bool = False,
    oracle_blend: tuple[float, ...] = (),
) -> dict:
    data = fit_and_record(seed, cache, row, folder)
    records, fit = data["records"], data["fit"]
    default_policy = parse_policy(data["policy"])
    family = Entropy(0.0, normalized=getattr(default_policy, "normalized", False))
    x = {name: features(r["logits"], r["cosines"]) for name, r in records.items()}
    names = list(FEATURES)
    if length:  # the text's length in tokens, the same at every layer (a score that reads it ranks rows by it too)
        if any("tokens" not in r for r in records.values()):
            raise SystemExit(f"error: {data.get('from_cache')} was recorded without the rows' lengths: delete it")
        x = {name: with_log_tokens(x[name], records[name]["tokens"]) for name in x}
        names.append("log_tokens")
    y = {name: agreement(r["logits"]) for name, r in records.items()}
    test = record_of(records["test"], family)
    budget = BUDGET_POINTS / 100
    full_accuracy = float((records["test"]["logits"][-1].argmax(-1) == records["test"]["labels"]).double().mean())
    default_path = [parse_policy(code) for code in data["certified_path"]] or [default_policy]
    rows = {
        "default (eek fit's certificate)": {
            "policy": fit["policy"],
            "path": fit["path"],
            "certified_layers_calibration": fit["certified_layers_calibration"],
            **on_test(default_policy, default_path, test),
            "test_auc_per_layer": aucs(-x["test"][:-1, :, FEATURES.index("entropy")], y["test"][:-1]),
        }
    }
    # the default recertified by this script's own call, as a check that the call is the fit's
    chosen, certificate, path = certified(
        record_of(records["calibration"], family), record_of(records["validation"], family), family
    )
    rows["default recertified here"] = {
        "policy": describe(chosen.policy, 4),
        "path": certificate.path,
        "path_layers_validation": certificate.path_layers,
        "certified_layers_calibration": certificate.mean_layers,
        "bound": certificate.bound,
        **on_test(chosen.policy, path, test),
    }
    inputs = {"logistic": x, "mlp": x}
    if hidden_probe:  # BERxiT's learning-to-exit reads the layer's hidden state: here its mean-pooled one
        pooled = pooled_states(seed, cache, row, records)
        probe_x = {name: np.concatenate([x[name], pooled[name][1:].float().numpy()], -1) for name in x}
        inputs |= {"probe": probe_x, "probe_mlp": probe_x}
    for kind, kind_x in inputs.items():
        started = time.perf_counter()
        score = LearnedScore(kind, seed).fit(kind_x[score_rows], y[score_rows])
        train_seconds = time.perf_counter() - started
        odds = {name: score.log_odds(kind_x[name]) for name in ("validation", "calibration", "test")}
        rows[kind] = {"train_seconds": round(train_seconds, 1), **certified_score(records, odds, family, y["test"])}
        print(kind, json.dumps({k: v for k, v in rows[kind].items() if "auc" not in k}), flush=True)
    # How good a score would have to be: the entropy as log-odds of agreement (a logistic regression on it alone per
    # layer, so the surrogate heads spread as a learned score's do), pushed towards each row's own agreement (read
    # from the truth, so not a score anyone can serve), certified the same way.
    if oracle_blend:
        entropy_only = {name: x[name][..., [FEATURES.index("entropy")]] for name in x}
        base = LearnedScore("logistic", seed).fit(entropy_only[score_rows], y[score_rows])
        base_odds = {name: base.log_odds(entropy_only[name]) for name in ("validation", "calibration", "test")}
        scale = base.log_odds(entropy_only[score_rows]).std(1, keepdims=True)
    for weight in oracle_blend:
        odds = {name: base_odds[name] + weight * scale * (2 * y[name][:-1] - 1) for name in base_odds}
        rows[f"oracle blend {weight:g}"] = certified_score(records, odds, family, y["test"])
        print(f"oracle blend {weight:g}", json.dumps(rows[f"oracle blend {weight:g}"]), flush=True)
    # each feature alone (test rows, per internal layer): ROC AUC for agreement with the full model; below 0.5,
    # the lower values agree (entropy, the distance moved)
    feature_aucs = {
        name: aucs(x["test"][:-1, :, i], y["test"][:-1]) for i, name in enumerate(names) if name != "agrees_prev"
    }
    feature_aucs["agrees_prev"] = aucs(x["test"][:-1, :, names.index("agrees_prev")], y["test"][:-1])
    return {
        **({} if row.source == "demo" else {"task_source": row.source}),
        "seed": seed,
        "score_rows": score_rows,
        "records_from_cache": data.get("from_cache"),
        "test_auc_per_feature": feature_aucs,
        "budget_points": BUDGET_POINTS,
        "confidence": CONFIDENCE,
        "features": names,
        "fit": fit,
        "rows": {name: len(r["labels"]) for name, r in records.items()},
        "agreement_with_full_per_layer": {name: [round(float(v), 4) for v in y[name].mean(1)] for name in SPLITS},
        "num_layers": int(test.num_layers),
        "full_test_accuracy": full_accuracy,
        "per_row_oracle_test_layers": per_row_oracle(test),
        "budget_on_test": budget,
        "scores": rows,
    }


def render(results: dict) -> str:
    lines = [
        f"per-row oracle on test: {results['per_row_oracle_test_layers']:.2f} of {results['num_layers']}",
        "| score | path | certified on calibration | certified on test (loss, points) | path oracle on test |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results["scores"].items():
        lines.append(
            f"| {name} | {r['path']} | {r['certified_layers_calibration']:.2f} | "
            f"{r['certified_test_layers']:.2f} ({r['certified_test_loss_points']:+.2f}) | "
            f"{r['path_oracle_test_layers']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/learned_score_cache"))
    parser.add_argument(
        "--task-source",
        choices=("demo", "benchmark"),
        default="demo",
        help="demo: make demo's export and csv files (the default); benchmark: certified_exits_real.py's "
        "Rotten Tomatoes 'train + validation file' row of --backbone (its cached classifier and splits)",
    )
    parser.add_argument(
        "--backbone",
        choices=("minilm", "mpnet"),
        default="minilm",
        help="--task-source benchmark only: MiniLM-L6 (the default) or MPNet-base (fine-tuned when not cached)",
    )
    parser.add_argument(
        "--setting",
        choices=BENCHMARK_SETTINGS,
        default=BENCHMARK_SETTING,
        help="--task-source benchmark only: the row's setting in certified_exits_real.py: the classifier "
        f"fine-tuned on the whole train split (the default), or on its first {FINE_TUNING_ROWS:,} rows, those rows "
        "the fit's TRAIN_FILE",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared 2-core machine)")
    parser.add_argument(
        "--from-folder",
        type=Path,
        help="--task-source benchmark only: the fit `eek fit MODEL train.csv FOLDER --calibration validation.csv` "
        "wrote on the same classifier and splits (make demo's csv files are the task's splits, row for row), read "
        "instead of fitting again",
    )
    parser.add_argument(
        "--hidden-probe",
        action="store_true",
        help="also score with each layer's mean-pooled hidden state beside the features (BERxiT's learning-to-exit "
        "input): a logistic probe (penalty chosen by 5-fold log loss) and an MLP of 16 units",
    )
    parser.add_argument(
        "--score-rows",
        choices=("heads_train", "validation"),
        default="heads_train",
        help="the rows the learned scores train on: the heads' training rows (the default, issue 108's), or the "
        "validation rows, which the heads never saw (and which also choose the path)",
    )
    parser.add_argument(
        "--length",
        action="store_true",
        help="add each text's log length in tokens to the learned scores' features (records made with it: a cache "
        "made before it is refused)",
    )
    parser.add_argument(
        "--oracle-blend",
        type=float,
        nargs="+",
        default=(),
        metavar="W",
        help="also certify, for each weight W, the entropy pushed W standard deviations towards each row's own "
        "agreement with the full model (read from the truth: how good a score would have to be, not a score)",
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.backbone != "minilm" and args.task_source != "benchmark":
        parser.error("--backbone picks the benchmark's row: give --task-source benchmark with it")
    if args.setting != BENCHMARK_SETTING and args.task_source != "benchmark":
        parser.error("--setting picks the benchmark's row: give --task-source benchmark with it")
    if args.from_folder is not None and args.task_source != "benchmark":
        parser.error("--from-folder stands for the benchmark row's fit: give --task-source benchmark with it")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = run(
        args.seed,
        args.cache,
        TaskRow(args.task_source, args.backbone, args.setting),
        args.from_folder,
        args.hidden_probe,
        args.score_rows,
        args.length,
        tuple(args.oracle_blend),
    )
    results = {**run_conditions(SCRIPT, argv, started), **results}
    if args.output:
        write_json(args.output, results)
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
