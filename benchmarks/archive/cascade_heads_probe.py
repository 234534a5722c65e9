"""Would heads that read the layers below lower the exit path's oracle? A probe for issue 62, item 2.

Finished investigation: on MiniLM-L6 / Rotten Tomatoes they do not (2.60-2.72 layers against today's 2.55),
and a learned exit score does what the per-layer path already does (2.34 against 2.28); docs/benchmarks.md,
"Heads that read the layers below". Its head training is ``real_task_head_variants.py``'s, kept apart
so that the committed result stays what this file's command gives.

The real task (``make demo``'s MiniLM-L6 fine-tuned on Rotten Tomatoes, unpatched and frozen):
the frozen model runs once over the train, validation and test splits and records what
mean-pooled exit heads read at layers 1-5 (``cache_exit_inputs``, cached in ``.cache/``). Head
forms, each trained on the train split's vectors alone (self-distillation and labels, half
each; early stopping on validation), then compared on test:

- ``own``: each head reads its own layer (what the package trains today, ``head="mlp"``);
- ``cat``: CATs' history (Schuster et al., 2021): head i reads its layer and the logits of
  the ``own`` heads below it (frozen);
- ``cascade``: Zero Time Waste's cascade (Wołczyk et al., 2021): head i reads its layer and head
  i-1's logits (trained in order, each on the one below frozen);
- ``ensemble``: ZTW's geometric ensemble over the cascade: ``sum_{j<=i} w_ij log p_j + b_i``
  (``w >= 0``), fitted on the train split after the heads.

For each, on ``Entropy`` thresholds (a grid of every distinct value): the path's test oracle, the
fewest mean layers whose test accuracy is at most 1 point below the full model's, and the same
on validation (what a threshold chosen there runs on test). And a learned exit score: a logistic
"agrees with the final layer" on per-layer features (top probability, margin, entropy, agreement
with the head below), exiting where the score passes a threshold, through the same grid.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/cascade_heads_probe.py \\
        --output benchmarks/results/amd_epyc/cascade_heads_probe_cpu.md
"""

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

import earlyexit_kernels as eek
from earlyexit_kernels.demo import real_task
from earlyexit_kernels.training.cached_heads import cache_exit_inputs

SPLITS = ("train", "validation", "test")
BUDGET = 0.01  # accuracy lost, a fraction


def cached_vectors(cache: Path, batch_size: int = 64) -> dict:
    """``{split: (inputs [N, L-1, H], final_logits [N, C], labels [N])}`` of the frozen fine-tuned model."""
    if cache.exists():
        return torch.load(cache)
    model, tokenizer, _ = real_task.fine_tuned_minilm(progress=False)
    eek.patch(model, eek.Entropy(0.0), pooling="mean", head="mlp")
    splits = real_task.load_rotten_tomatoes()
    out = {}
    for name in SPLITS:
        split = splits[name]
        batches = []
        for start in range(0, len(split), batch_size):
            rows = range(start, min(start + batch_size, len(split)))
            batch = dict(real_task.tokenize(tokenizer, [split.texts[i] for i in rows]))
            batch["labels"] = torch.tensor([split.labels[i] for i in rows])
            batches.append(batch)
        recorded = cache_exit_inputs(model, batches)
        out[name] = (recorded.inputs[:, :-1].clone(), recorded.final_logits, recorded.labels)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def _mlp(width_in: int, classes: int, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width_in), nn.Linear(width_in, width), nn.GELU(), nn.Linear(width, classes))


def _loss(logits, final, labels):
    ce = nn.functional.cross_entropy(logits, labels)
    kd = nn.functional.kl_div(torch.log_softmax(logits, -1), torch.softmax(final, -1), reduction="batchmean")
    return 0.5 * ce + 0.5 * kd


def _fit(module: nn.Module, features, val_features, data, seed: int, epochs: int = 30) -> nn.Module:
    """``module`` trained on ``features(split) -> [N, ...]`` of the train split; best validation loss kept."""
    torch.manual_seed(seed)
    _, final, labels = data["train"]
    _, val_final, val_labels = data["validation"]
    x, val_x = features, val_features
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, worse = float("inf"), None, 0
    for _ in range(epochs):
        module.train()
        for rows in torch.randperm(x.shape[0], generator=generator).split(32):
            loss = _loss(module(x[rows]), final[rows], labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        module.eval()
        with torch.no_grad():
            val_loss = _loss(module(val_x), val_final, val_labels).item()
        if val_loss < best - 1e-4:
            best, best_state, worse = val_loss, copy.deepcopy(module.state_dict()), 0
        else:
            worse += 1
            if worse >= 3:
                break
    module.load_state_dict(best_state)
    return module.eval()


@torch.no_grad()
def _apply(modules, inputs_of) -> dict:
    return {split: [m(inputs_of(split, i)) for i, m in enumerate(modules)] for split in SPLITS}


def own_heads(data, seed):
    layers, hidden = data["train"][0].shape[1], data["train"][0].shape[2]
    classes = data["train"][1].shape[-1]
    heads = [
        _fit(_mlp(hidden, classes), data["train"][0][:, i], data["validation"][0][:, i], data, seed + i)
        for i in range(layers)
    ]
    return _apply(heads, lambda split, i: data[split][0][:, i])


def cat_heads(data, own, seed):
    """Head i reads its layer and the ``own`` heads' logits below it."""
    layers, hidden = data["train"][0].shape[1], data["train"][0].shape[2]
    classes = data["train"][1].shape[-1]

    def features(split, i):
        return torch.cat([data[split][0][:, i], *own[split][:i]], -1)

    heads = [
        _fit(_mlp(hidden + i * classes, classes), features("train", i), features("validation", i), data, seed + i)
        for i in range(layers)
    ]
    return _apply(heads, features)


def cascade_heads(data, seed):
    """Head i reads its layer and head i-1's logits, trained in order."""
    layers, hidden = data["train"][0].shape[1], data["train"][0].shape[2]
    classes = data["train"][1].shape[-1]
    out = {split: [] for split in SPLITS}
    for i in range(layers):

        def features(split, i=i):
            below = out[split][i - 1 : i]
            return torch.cat([data[split][0][:, i], *below], -1)

        head = _fit(
            _mlp(hidden + (classes if i else 0), classes), features("train"), features("validation"), data, seed + i
        )
        with torch.no_grad():
            for split in SPLITS:
                out[split].append(head(features(split)))
    return out


class _Geometric(nn.Module):
    def __init__(self, count: int, classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(count))  # softplus(0) = 0.69
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, log_probs):  # [N, count, C]
        return (nn.functional.softplus(self.weight)[None, :, None] * log_probs).sum(1) + self.bias


def ensemble(data, cascade, seed):
    """ZTW's geometric ensemble over the cascade's heads 1..i, fitted on the train split."""
    layers = len(cascade["train"])
    out = {split: [] for split in SPLITS}
    for i in range(layers):

        def stacked(split, i=i):
            return torch.stack([torch.log_softmax(z, -1) for z in cascade[split][: i + 1]], 1)

        module = _fit(
            _Geometric(i + 1, stacked("train").shape[-1]), stacked("train"), stacked("validation"), data, seed
        )
        with torch.no_grad():
            for split in SPLITS:
                out[split].append(module(stacked(split)))
    return out


def _entropy(logits):
    p = torch.softmax(logits.float(), -1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def exit_path(scores: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """The exit layer (0-based; ``len(scores)`` = the final layer) of every row: the first whose score <= threshold."""
    stacked = torch.stack(scores, 1)  # [N, L-1]
    below = stacked <= threshold
    first = torch.where(
        below.any(1), below.float().argmax(1), torch.full_like(below[:, 0], len(scores), dtype=torch.long)
    )
    return first


def operating_points(heads: list, final, labels, scores: list):
    """``[(threshold, accuracy lost, mean layers)]`` over every distinct score (ascending)."""
    logits = torch.stack([*heads, final], 1)  # [N, L, C]
    full = (final.argmax(-1) == labels).float().mean().item()
    thresholds = torch.unique(torch.stack(scores).flatten())
    thresholds = thresholds[torch.linspace(0, len(thresholds) - 1, min(len(thresholds), 400)).long()]
    points = []
    for t in [float("-inf"), *thresholds.tolist()]:
        layer = exit_path(scores, t)
        chosen = logits[torch.arange(len(labels)), layer]
        accuracy = (chosen.argmax(-1) == labels).float().mean().item()
        points.append((t, full - accuracy, (layer + 1).float().mean().item()))
    return points


def oracle(points) -> tuple[float, float]:
    """The fewest mean layers within the budget: (threshold, layers)."""
    ok = [(layers, t) for t, lost, layers in points if lost <= BUDGET]
    layers, t = min(ok)
    return t, layers


def at_threshold(points, threshold) -> tuple[float, float]:
    for t, lost, layers in points:
        if t == threshold:
            return lost, layers
    raise KeyError(threshold)


FEATURES = ("top", "margin", "entropy", "agrees below", "layer")


def learned_score(data, heads: dict, seed: int, features_used=FEATURES) -> dict:
    """A logistic "agrees with the final" per layer on (top prob, margin, entropy, agrees with the head below);
    the exit score is 1 - P(agrees), so that lower exits, as entropy does."""
    torch.manual_seed(seed)

    def features(split, i):
        z = heads[split][i].float()
        p = torch.softmax(z, -1)
        top = p.topk(2, -1).values
        below = heads[split][i - 1].argmax(-1) if i else torch.full_like(z[:, 0], -1, dtype=torch.long)
        named = {
            "top": top[:, 0],
            "margin": top[:, 0] - top[:, 1],
            "entropy": _entropy(z),
            "agrees below": (z.argmax(-1) == below).float(),
            "layer": torch.full_like(top[:, 0], i),
        }
        return torch.stack([named[name] for name in features_used], -1)

    out = {split: [] for split in SPLITS}
    for i in range(len(heads["train"])):
        x = features("train", i)
        y = (heads["train"][i].argmax(-1) == data["train"][1].argmax(-1)).float()
        model = nn.Linear(x.shape[1], 1)
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200)

        def closure(model=model, x=x, y=y, optimizer=optimizer):
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            for split in SPLITS:
                out[split].append(1 - torch.sigmoid(model(features(split, i)).squeeze(-1)))
    return out


def per_layer_path_oracle(data, heads: dict, built_on: str) -> tuple[float, float, float]:
    """The package's per-layer entropy path (``certified_paths.per_layer_path``) built on ``built_on``'s rows:
    (test oracle, the validation oracle's layers on test, its test loss in points)."""
    from earlyexit_kernels.calibration.candidates import per_layer_path
    from earlyexit_kernels.calibration.record import ExitRecord, replay

    def record(split):
        logits = torch.stack([*heads[split], data[split][1]])
        return ExitRecord(logits, data[split][2], None, None, eek.Entropy(0.0))

    candidates = per_layer_path(record(built_on), eek.Entropy(0.0))
    found = {}
    for split in ("validation", "test"):
        rec = record(split)
        full = (data[split][1].argmax(-1) == data[split][2]).float().mean().item()
        found[split] = []
        for candidate in candidates:
            out = replay(candidate, rec)
            lost = full - (out.logits.float().argmax(-1) == rec.labels).float().mean().item()
            found[split].append((lost, out.layers_run.float().mean().item()))
    test_oracle = min(layers for lost, layers in found["test"] if lost <= BUDGET)
    chosen = min(range(len(candidates)), key=lambda i: (found["validation"][i][0] > BUDGET, found["validation"][i][1]))
    return test_oracle, found["test"][chosen][1], 100 * found["test"][chosen][0]


def evaluate(name: str, data, heads: dict, scores: dict | None = None) -> dict:
    scores = scores or {split: [_entropy(z) for z in heads[split]] for split in SPLITS}
    val_points = operating_points(
        heads["validation"], data["validation"][1], data["validation"][2], scores["validation"]
    )
    test_points = operating_points(heads["test"], data["test"][1], data["test"][2], scores["test"])
    _, test_oracle = oracle(test_points)
    val_threshold, val_layers = oracle(val_points)
    # the validation threshold replayed on test
    layer = exit_path(scores["test"], val_threshold)
    logits = torch.stack([*heads["test"], data["test"][1]], 1)
    chosen = logits[torch.arange(len(layer)), layer]
    full = (data["test"][1].argmax(-1) == data["test"][2]).float().mean().item()
    lost = full - (chosen.argmax(-1) == data["test"][2]).float().mean().item()
    head_accuracy = [round(100 * (z.argmax(-1) == data["test"][2]).float().mean().item(), 1) for z in heads["test"]]
    return {
        "form": name,
        "test oracle": test_oracle,
        "validation oracle": val_layers,
        "val threshold on test": (layer + 1).float().mean().item(),
        "its test loss (points)": 100 * lost,
        "head test accuracy by layer (%)": head_accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/probe/minilm_rt_mean_vectors.pt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--own-only", action="store_true", help="the heads of today and the exit scores only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    data = cached_vectors(args.cache)
    cached = time.perf_counter() - started
    rows, seconds = [], {}
    t = time.perf_counter()
    own = own_heads(data, args.seed)
    seconds["own"] = time.perf_counter() - t
    rows.append(evaluate("own (today)", data, own))
    t = time.perf_counter()
    rows.append(evaluate("own + learned exit score", data, own, learned_score(data, own, args.seed)))
    seconds["learned score"] = time.perf_counter() - t
    for used in (("entropy",), ("entropy", "agrees below"), ("top", "margin", "entropy")):
        rows.append(
            evaluate(
                f"own + learned exit score on {', '.join(used)}", data, own, learned_score(data, own, args.seed, used)
            )
        )
    for built_on in ("train", "validation"):
        test_oracle, on_test, lost = per_layer_path_oracle(data, own, built_on)
        rows.append(
            {
                "form": f"own + the per-layer entropy path, built on the {built_on} rows",
                "test oracle": test_oracle,
                "validation oracle": float("nan"),
                "val threshold on test": on_test,
                "its test loss (points)": lost,
                "head test accuracy by layer (%)": rows[0]["head test accuracy by layer (%)"],
            }
        )
    if args.own_only:
        return _write(rows, data, args, cached, seconds)
    t = time.perf_counter()
    cat = cat_heads(data, own, args.seed)
    seconds["cat"] = time.perf_counter() - t
    rows.append(evaluate("cat (history logits)", data, cat))
    rows.append(evaluate("cat + learned exit score", data, cat, learned_score(data, cat, args.seed)))
    t = time.perf_counter()
    cascade = cascade_heads(data, args.seed)
    seconds["cascade"] = time.perf_counter() - t
    rows.append(evaluate("cascade (ZTW)", data, cascade))
    t = time.perf_counter()
    ens = ensemble(data, cascade, args.seed)
    seconds["ensemble"] = time.perf_counter() - t
    rows.append(evaluate("cascade + geometric ensemble (ZTW)", data, ens))
    rows.append(evaluate("ensemble + learned exit score", data, ens, learned_score(data, ens, args.seed)))
    return _write(rows, data, args, cached, seconds)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _write(rows, data, args, cached, seconds) -> None:
    lines = [
        "# Heads that read the layers below: a probe (MiniLM-L6, Rotten Tomatoes, mean-pooled MLP heads)",
        "",
        f"`python benchmarks/archive/cascade_heads_probe.py --seed {args.seed}`; budget: {100 * BUDGET:.0f} point of accuracy "
        f"lost against the full model; {len(data['train'][2])} train, {len(data['validation'][2])} validation, "
        f"{len(data['test'][2])} test rows. Layers of 6. Machine: {_cpu()}; the frozen model's vectors "
        f"{'read from the cache' if cached < 60 else f'cached in {cached:.0f} s'}; head training "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + " (seconds, not timings, where other jobs ran beside it).",
        "",
        "| head form, exit score | test oracle | validation oracle | the validation threshold on test | its test loss (points) | heads' test accuracy, layers 1-5 (%) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['form']} | {row['test oracle']:.2f} | {row['validation oracle']:.2f} | "
            f"{row['val threshold on test']:.2f} | {row['its test loss (points)']:+.2f} | "
            f"{', '.join(map(str, row['head test accuracy by layer (%)']))} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
