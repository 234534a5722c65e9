"""Where an early-exit pass spends the time its layer ideal does not account for.

The stack benchmark's fp32 row on the real task: the fitted MiniLM-L6 of ``make demo`` and the
unpatched model classify the same test texts in the same length-sorted batches of 32. Hooks on
the encoder layers time every layer call (CPU ops are synchronous) and count the token-rows it
ran (rows x padded length), so a pass splits into

- the layers: their time, and the token-rows run against the unpatched model's;
- everything else: embeddings, the exit heads, the exit step, compaction and read-backs.

The layer ideal (L / mean layers) counts sequences; the layers' own share is the token-layer
ratio (longer sequences run deeper in a sorted batch) times the per-token cost at the smaller
row counts of later layers (matrix products are less efficient on fewer rows).

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/early_exit_profile.py --texts 600 --repeats 5 \\
        --output benchmarks/results/stack_cpu/early_exit_profile.txt
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.bench.stack import load_task
from earlyexit_kernels.patching.patch import current_adapter

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class LayerClock:
    """Times every call of the encoder layers of ``model`` and counts the token-rows they ran."""

    def __init__(self, layers):
        self.seconds = 0.0
        self.token_rows = 0
        self._start = 0.0
        self._handles = [layer.register_forward_pre_hook(self._pre) for layer in layers]
        self._handles += [layer.register_forward_hook(self._post) for layer in layers]

    def _pre(self, module, args):
        hidden = args[0]
        self.token_rows += hidden.shape[0] * hidden.shape[1]
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._start

    def reset(self):
        self.seconds, self.token_rows = 0.0, 0

    def remove(self):
        for handle in self._handles:
            handle.remove()


class HeadClock:
    """Times the exit heads of a patched model: ``exit_input`` (pooling) and ``classify`` of its adapter."""

    def __init__(self, adapter):
        self.seconds = 0.0
        for name in ("exit_input", "classify"):
            setattr(adapter, name, self._timed(getattr(adapter, name)))

    def _timed(self, function):
        def timed(*args):
            start = time.perf_counter()
            result = function(*args)
            self.seconds += time.perf_counter() - start
            return result

        return timed


def one_pass(model, batches, clock, heads=None):
    clock.reset()
    if heads is not None:
        heads.seconds = 0.0
    layers = 0.0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            out = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
            if getattr(out, "layers_run", None) is not None:
                layers += float(out.layers_run.float().sum())
    return time.perf_counter() - start, clock.seconds, clock.token_rows, layers, heads.seconds if heads else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patched, full, batches, _, folder = load_task(args.texts)
    num_layers = patched.config.num_hidden_layers
    clocks = {
        "early exit": (patched, LayerClock(patched.bert.encoder.layer)),
        "unpatched": (full, LayerClock(full.bert.encoder.layer)),
    }
    heads = {"early exit": HeadClock(current_adapter(patched)), "unpatched": None}
    runs = {name: [] for name in clocks}
    for name, (model, clock) in clocks.items():
        one_pass(model, batches, clock, heads[name])  # warm-up
    for _ in range(args.repeats):
        for name, (model, clock) in clocks.items():
            runs[name].append(one_pass(model, batches, clock, heads[name]))
    median = {name: [statistics.median(r[i] for r in rows) for i in (0, 1, 2, 4)] for name, rows in runs.items()}
    texts = sum(b["input_ids"].shape[0] for b in batches)
    mean_layers = runs["early exit"][0][3] / texts
    (ee_wall, ee_layers, ee_tokens, ee_heads), (full_wall, full_layers, full_tokens, _) = (
        median["early exit"],
        median["unpatched"],
    )
    token_ratio = ee_tokens / full_tokens
    per_token = (ee_layers / ee_tokens) / (full_layers / full_tokens)
    lines = [
        f"{texts} test texts in {len(batches)} length-sorted batches of 32, {args.threads} threads, fp32, "
        f"median of {args.repeats} interleaved passes; model {Path(folder).name}, policy {eek.policy_of(patched)}",
        f"unpatched: {full_wall:.3f} s, layers {full_layers:.3f} s ({100 * full_layers / full_wall:.1f}%), "
        f"the rest {full_wall - full_layers:.3f} s",
        f"early exit: {ee_wall:.3f} s at {mean_layers:.2f} of {num_layers} layers, layers {ee_layers:.3f} s, "
        f"the rest {ee_wall - ee_layers:.3f} s",
        f"speed-up {full_wall / ee_wall:.2f}x, layer ideal {num_layers / mean_layers:.2f}x "
        f"(sequence-layers {mean_layers / num_layers:.3f} of the unpatched model's)",
        f"token-rows the layers ran: {token_ratio:.3f} of the unpatched model's; time per token-row in the layers: "
        f"{per_token:.3f}x the unpatched model's",
        f"time beyond the sequence-layer share ({ee_wall - full_wall * mean_layers / num_layers:.3f} s): "
        f"more token-rows {full_layers * (token_ratio - mean_layers / num_layers):.3f} s, "
        f"their higher per-token cost {ee_layers - full_layers * token_ratio:.3f} s, "
        f"outside the layers (exit heads, exit step, compaction, read-backs; embeddings beyond their share) "
        f"{(ee_wall - ee_layers) - (full_wall - full_layers) * mean_layers / num_layers:.3f} s",
        f"of which the heads' pooling and classifiers (every layer, the model's own at the last): {ee_heads:.3f} s",
    ]
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/early_exit_profile.py " + " ".join(
            f"--{k} {v}" for k, v in (("texts", args.texts), ("repeats", args.repeats), ("threads", args.threads))
        )
        args.output.write_text(f"# {command}\n{text}\n")


if __name__ == "__main__":
    main()
