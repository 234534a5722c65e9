"""One BERT layer on a padded batch against the same layer packed (its real tokens only), by real-token share.

Finished investigation: packed runs 1.62-3.54x faster at 39-14% real tokens, 1.01-1.07x at 84%, 0.91-0.92x at
96%: hence packed below 3/4 (docs/serving.md, "Many sequences: `eek.classify` and the continuous engine").

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/packed_vs_padded_layer.py --out benchmarks/results/intel_xeon/packed_layer_cpu.md

A random BERT layer (hidden 128 and 384, 4 x hidden feed-forward, SDPA), 32 rows: 31 of one
length and one longest row, so the real-token share goes from 0.96 (lengths close to the
longest) down to 0.14 (one 256-token row among 28-token rows). ``padded``: the layer module on
[32, S, H] with its mask; ``packed``: :func:`earlyexit_kernels.engine.layers.packed_layer.run_packed`.
Best of 3 rounds of 10 calls each, the two interleaved, on 1 and 2 threads. The continuous
engine packs a call below ``PACK_BELOW_FILL`` real tokens; this is where that number comes from.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

from earlyexit_kernels.backends.compaction import layer_attention_mask
from earlyexit_kernels.engine.engines.continuous.scheduler import PACK_BELOW_FILL
from earlyexit_kernels.engine.layers.packed_layer import run_packed

SHAPES = [(48, 40), (48, 44), (48, 46), (64, 24), (128, 30), (256, 28)]  # (longest, the other rows' length)
ROWS = 32


def _seconds_per_call(fn, calls: int = 10) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls


def measure(hidden: int, longest: int, short: int) -> tuple[float, float, float]:
    """(real-token share, padded seconds, packed seconds) of one call."""
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=1, num_attention_heads=max(2, hidden // 64), intermediate_size=4 * hidden
    )
    layer = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval().bert.encoder.layer[0]
    lengths = torch.full((ROWS,), short)
    lengths[-1] = longest
    mask = torch.arange(longest)[None, :] < lengths[:, None]
    hidden_states = torch.randn(ROWS, longest, hidden, generator=torch.Generator().manual_seed(0))
    layer_mask = layer_attention_mask(mask, "sdpa", torch.float32)
    positions = torch.nonzero(mask.reshape(-1)).squeeze(1)
    with torch.no_grad():

        def padded():
            return layer(hidden_states, layer_mask)

        def packed():
            return run_packed(layer, hidden_states, positions, layer_mask)

        for fn in (padded, packed):  # warm-up
            fn()
        times = {padded: [], packed: []}
        for _ in range(3):
            for fn in (padded, packed):
                times[fn].append(_seconds_per_call(fn))
    return float(mask.float().mean()), min(times[padded]), min(times[packed])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table here too (markdown)")
    args = parser.parse_args()
    lines = [
        "# One BERT layer padded against packed (`benchmarks/archive/packed_vs_padded_layer.py`)",
        "",
        f"32 rows, SDPA, fp32, 2-core CPU under an exclusive lock; the engine packs below {PACK_BELOW_FILL} real tokens.",
        "",
        "| threads | hidden | longest | real tokens | padded ms | packed ms | padded / packed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for hidden in (128, 384):
                for longest, short in SHAPES:
                    share, padded, packed = measure(hidden, longest, short)
                    lines.append(
                        f"| {threads} | {hidden} | {longest} | {share:.2f} | {padded * 1e3:.2f} | {packed * 1e3:.2f} "
                        f"| {padded / packed:.2f}x |"
                    )
                    print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(before)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
