"""Where an early-exit pass spends the time its layer ideal does not account for.

The stack benchmark's fp32 row on the real task: the fitted MiniLM-L6 of ``make demo`` and the
unpatched model classify the same test texts in the same length-sorted batches of 32. Hooks on
the encoder layers time every layer call (CPU ops are synchronous) and count the token-rows it
ran (rows x padded length), so a pass splits into

- the layers: their time, and the token-rows run against the unpatched model's;
- everything else: embeddings, the exit heads, the exit step, compaction and read-backs.

The early-exit pass runs twice: with the C++ backend's fused per-layer step (pooling, head and
rule in one op) and with it switched off (the pooling and head as PyTorch modules, the rule in C++).

The layer ideal (L / mean layers) counts sequences; the token-layer ideal counts each row's
valid tokens times the layers it ran (longer sequences run deeper in a sorted batch, which is
not overhead). The layers' own share is the token-rows they ran (padding included) times the
per-token cost at the smaller row counts of later layers (matrix products are less efficient
on fewer rows).

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/profiles/early_exit_profile.py --texts 600 --repeats 5 \\
        --output benchmarks/results/amd_epyc/stack_cpu/early_exit_profile.txt
"""

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

import earlyexit_kernels as eek
from benchmarks.suite.stack import load_task
from earlyexit_kernels.backends import registry

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


@contextlib.contextmanager
def step_unfused():
    """The C++ backend without its fused per-layer step (pooling, head and rule in one op): the
    pooling and head run as PyTorch modules and the rule alone in C++, as before that step existed."""
    before = registry._REGISTRY["cpp"]
    registry._REGISTRY["cpp"] = dataclasses.replace(
        before, pooled_head_exit_step=None, pooled_head_exit_step_write_back=None
    )
    try:
        yield
    finally:
        registry._REGISTRY["cpp"] = before


def one_pass(model, batches, clock, unfused=False):
    """``(seconds, layer seconds, token-rows the layers ran, sequence-layers, token-layers, batch-layers)``:
    token-layers counts each row's valid tokens times the layers it ran; batch-layers the layer calls."""
    clock.reset()
    layers = token_layers = batch_layers = 0.0
    num_layers = model.config.num_hidden_layers
    with step_unfused() if unfused else contextlib.nullcontext():
        start = time.perf_counter()
        with torch.inference_mode():
            outs = [model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}) for batch in batches]
        seconds = time.perf_counter() - start
    for batch, out in zip(batches, outs):
        runs = getattr(out, "layers_run", None)
        if runs is None:
            runs = torch.full((batch["input_ids"].shape[0],), num_layers)
        lengths = batch["attention_mask"].sum(1)
        layers += float(runs.sum())
        token_layers += float((runs * lengths).sum())
        batch_layers += float(runs.max())
    return seconds, clock.seconds, clock.token_rows, layers, token_layers, batch_layers


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
        "unpatched": (full, LayerClock(full.bert.encoder.layer), False),
        "early exit": (patched, LayerClock(patched.bert.encoder.layer), False),
        "early exit, step unfused": (patched, LayerClock(patched.bert.encoder.layer), True),
    }
    runs = {name: [] for name in clocks}
    for model, clock, unfused in clocks.values():
        one_pass(model, batches, clock, unfused)  # warm-up
    for _ in range(args.repeats):
        for name, (model, clock, unfused) in clocks.items():
            runs[name].append(one_pass(model, batches, clock, unfused))
    median = {name: [statistics.median(r[i] for r in rows) for i in range(6)] for name, rows in runs.items()}
    texts = sum(b["input_ids"].shape[0] for b in batches)
    full_wall, full_layers, full_tokens, _, full_token_layers, _ = median["unpatched"]
    lines = [
        f"{texts} test texts in {len(batches)} length-sorted batches of 32, {args.threads} threads, fp32, "
        f"median of {args.repeats} interleaved passes; model {Path(folder).name}, policy {eek.policy_of(patched)}",
        f"unpatched: {full_wall:.3f} s, layers {full_layers:.3f} s ({100 * full_layers / full_wall:.1f}%), "
        f"the rest {full_wall - full_layers:.3f} s",
    ]
    for name in ("early exit", "early exit, step unfused"):
        wall, in_layers, tokens, layers, token_layers, batch_layers = median[name]
        mean_layers = layers / texts
        token_ratio = tokens / full_tokens
        per_token = (in_layers / tokens) / (full_layers / full_tokens)
        outside = (wall - in_layers) - (full_wall - full_layers) * mean_layers / num_layers
        token_ideal = full_token_layers / token_layers
        lines += [
            f"{name}: {wall:.3f} s at {mean_layers:.2f} of {num_layers} layers, layers {in_layers:.3f} s, "
            f"the rest {wall - in_layers:.3f} s",
            f"  speed-up {full_wall / wall:.2f}x; layer ideal {num_layers / mean_layers:.2f}x (sequence-layers), "
            f"token-layer ideal {token_ideal:.2f}x (each row's tokens times the layers it ran): "
            f"{full_wall / wall / token_ideal:.2f} of it",
            f"  token-rows the layers ran (padding included): {token_ratio:.3f} of the unpatched model's; "
            f"time per token-row in the layers: {per_token:.3f}x the unpatched model's",
            f"  time beyond the sequence-layer share ({wall - full_wall * mean_layers / num_layers:.3f} s): "
            f"more token-rows {full_layers * (token_ratio - mean_layers / num_layers):.3f} s, "
            f"their higher per-token cost {in_layers - full_layers * token_ratio:.3f} s, "
            f"outside the layers (exit heads, exit step, compaction, read-backs; embeddings beyond their share) "
            f"{outside:.3f} s = {1000 * outside / batch_layers:.2f} ms per layer call of a batch "
            f"({batch_layers:.0f} calls)",
        ]
    text = "\n".join(lines)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/profiles/early_exit_profile.py " + " ".join(
            f"--{k} {v}" for k, v in (("texts", args.texts), ("repeats", args.repeats), ("threads", args.threads))
        )
        args.output.write_text(f"# {command}\n{text}\n")


if __name__ == "__main__":
    main()
