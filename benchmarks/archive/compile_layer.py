"""One encoder layer, eager against ``torch.compile``, at the continuous engine's call shapes (CPU).

Finished investigation: compiled, one layer at the stream's call shapes runs 1.06-1.12x faster than eager: its
time is in the same GEMMs either way (docs/benchmarks.md, "Benchmarks", the continuous engine).

Why ``eek.classify(compile=True)`` gains little on this CPU: the layer itself, timed alone
at the shapes the stream benchmark's calls take (64 rows; padded lengths 16-64), compiled
with Inductor's default mode against eager.

    python benchmarks/archive/compile_layer.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer


def timed(fn, *args, repeats: int) -> float:
    for _ in range(3):
        fn(*args)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--lengths", default="16,32,64")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = BertConfig(hidden_size=args.hidden, num_attention_heads=4, intermediate_size=4 * args.hidden)
    config._attn_implementation = "sdpa"
    layer = BertLayer(config).eval()
    compiled = torch.compile(layer, dynamic=False)
    print(f"BERT layer H={args.hidden}, {args.rows} rows, fp32, {args.threads} thread(s), torch {torch.__version__}")
    print("| padded length | eager ms | compiled ms | eager / compiled |")
    print("| --- | --- | --- | --- |")
    with torch.inference_mode():
        for length in (int(n) for n in args.lengths.split(",")):
            hidden = torch.randn(args.rows, length, args.hidden)
            eager_s = timed(layer, hidden, repeats=args.repeats)
            compiled_s = timed(compiled, hidden, repeats=args.repeats)
            print(f"| {length} | {1e3 * eager_s:.2f} | {1e3 * compiled_s:.2f} | {eager_s / compiled_s:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
