"""What the exit head and exit step cost right after an encoder layer, against the same call warm (CPU).

Finished investigation: right after a layer the small ops run cold: the C++ head op 88-124 us at hidden 128,
32 rows, against 40 us warm; past `cpp_backend.CPU_HEAD_MAX_WORK` torch's GEMM is faster (docs/benchmarks.md,
"Benchmarks").

An early-exit engine runs the exit head of a layer right after that layer. On a CPU the
layer's matrix products push the host code's instructions and data out of the caches, so
every small op that follows runs cold. This measures that on the continuous grid's models
(random BERT, hidden 128 and 384, 12 layers, 2 labels), one layer call of ``--rows`` rows of
``--length`` tokens:

- ``layer``: one encoder layer (``adapter.run_layer``), alone, per call;
- ``head in situ``: the engine's head-and-exit step (``batch_loop.head_and_exit_step``,
  Entropy, on the backend the engine picks) on a layer call's output and the read of which
  rows exit, timed alone right after each of ``--calls`` layer calls, median;
- ``head warm``: the same head-and-exit step called back to back (caches warm), median;
- ``C++ head in situ`` / ``torch head in situ``: the two CPU implementations of the head and
  rule alone on the [CLS] rows, after a layer: the C++ op (``cpp_packed_head_exit_step``,
  float32, one thread) and torch's pooler and classifier products then the C++ rule (what the
  backend runs past ``cpp_backend.CPU_HEAD_MAX_WORK`` rows x H^2 x threads);
- ``one add in situ`` / ``warm``: a single 3-element ``torch.add``, after a layer or warm:
  what any small op pays after a layer, whatever its own work.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/exit_head_in_situ.py --threads 1,2
    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/exit_head_in_situ.py --threads 2 \
        --hidden 128,384,768 --rows 32,128,256 --calls 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

import earlyexit_kernels as eek
from earlyexit_kernels.backends import cpp_backend
from earlyexit_kernels.backends.registry import resolve_backend
from earlyexit_kernels.bench.timing import median_us
from earlyexit_kernels.engine.step.batch_loop import can_fuse_head, head_and_exit_step
from earlyexit_kernels.methods.exit_rules import init_state
from earlyexit_kernels.patching.patch import current_adapter

LAYERS, LABELS = 12, 2


def _model(hidden: int):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=max(2, hidden // 64),
        intermediate_size=4 * hidden,
        num_labels=LABELS,
    )
    model = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    eek.patch(model, eek.Entropy(0.3))
    return model


def _after_layer_us(layer, fn, calls: int) -> float:
    """Median microseconds of ``fn(output)`` timed alone, each call on the output of a call of ``layer()`` just made."""
    samples = []
    for _ in range(calls):
        output = layer()
        start = time.perf_counter()
        fn(output)
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def measure(hidden: int, rows: int, length: int, calls: int) -> dict:
    model = _model(hidden)
    adapter = current_adapter(model)
    policy = eek.policy_of(model)
    backend = resolve_backend(eek.backend_of(model), torch.device("cpu"), dtype=torch.float32)
    states = torch.randn(rows, length, hidden)
    small = torch.ones(3)

    with torch.no_grad():
        fused = can_fuse_head(backend, adapter)

        def layer():
            return adapter.run_layer(0, states, None)

        def head(hidden_states):
            state = init_state(policy, rows, LABELS, hidden, LAYERS, hidden_states.device, pooled_dtype=torch.float32)
            exits = head_and_exit_step(adapter, backend, policy, 3, hidden_states, None, state, fused=fused)[0]
            return any(exits.tolist())

        pooler_weight, pooler_bias, head_weight, head_bias = adapter.head_weights(3)
        transposed = cpp_backend.transposed_pooler(pooler_weight)
        rule_args = cpp_backend._rule_args(cpp_backend.lower_policy(policy, LAYERS), 3, LAYERS, None)

        def cpp_head(hidden_states):
            cls = hidden_states[:, 0]
            op = torch.ops.earlyexit.cpp_packed_head_exit_step
            return op(cls, transposed, pooler_bias, head_weight, head_bias, None, [], *rule_args)[0].tolist()

        def torch_head(hidden_states):
            _, logits = cpp_backend._torch_head(hidden_states[:, 0], pooler_weight, pooler_bias, head_weight, head_bias)
            return torch.ops.earlyexit.cpp_exit_step(logits, None, [], *rule_args)[0].tolist()

        for _ in range(5):  # warm-up
            output = layer()
            head(output)
        return {
            "layer": median_us(layer, 50),
            "head in situ": _after_layer_us(layer, head, calls),
            "head warm": median_us(lambda: head(output), 200),
            "C++ head in situ": _after_layer_us(layer, cpp_head, calls),
            "torch head in situ": _after_layer_us(layer, torch_head, calls),
            "one add in situ": _after_layer_us(layer, lambda _: torch.add(small, small), calls),
            "one add warm": median_us(lambda: torch.add(small, small), 200),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="128,384", help="hidden sizes, comma-separated")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--rows", default="32", help="rows per layer call, comma-separated")
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200, help="layer calls per in-situ timing")
    args = parser.parse_args()
    print(f"{args.length} tokens per row; microseconds per call (median)")
    header = [
        "hidden",
        "rows",
        "threads",
        "layer",
        "head in situ",
        "head warm",
        "in situ % of layer",
        "C++ head in situ",
        "torch head in situ",
        "one add in situ",
        "warm",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for hidden in (int(h) for h in args.hidden.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                _row(hidden, rows, threads, measure(hidden, rows, args.length, args.calls))


def _row(hidden: int, rows: int, threads: int, r: dict) -> None:
    cells = [
        hidden,
        rows,
        threads,
        f"{r['layer']:.0f}",
        f"{r['head in situ']:.0f}",
        f"{r['head warm']:.0f}",
        f"{100 * r['head in situ'] / r['layer']:.1f}%",
        f"{r['C++ head in situ']:.0f}",
        f"{r['torch head in situ']:.0f}",
        f"{r['one add in situ']:.0f}",
        f"{r['one add warm']:.1f}",
    ]
    print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
