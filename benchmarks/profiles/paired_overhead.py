"""Overhead of the patched model when nothing exits, as paired ratios (CPU).

The end-to-end sweep times each method's repetitions separately; on a shared, noisy
machine its f = 0 overhead moves by several percent between runs. Here every
repetition times the unpatched model and then the patched one back to back and keeps
their ratio, so slow phases of the machine hit both sides alike.

    python benchmarks/profiles/paired_overhead.py --batch-sizes 1,32,64 --repeats 15
    python benchmarks/profiles/paired_overhead.py --batch-sizes 1 --policy "Entropy(1e-9)"

By default nothing exits through ``Scheduled`` (every sequence scheduled for the last
layer), which needs no exit head before it; ``--policy`` takes a policy that must compute
its head on every layer and, at a tiny threshold, lets nothing leave either.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.bench import models, patterns
from earlyexit_kernels.methods.policy_spec import parse_policy


def paired_ratios(model, ids, mask, policy, backend: str, repeats: int, warmup: int = 2) -> list[float]:
    """``repeats`` ratios eek / full, each from one full and one patched forward back to back."""
    ratios = []
    with torch.inference_mode():
        for rep in range(warmup + repeats):
            seconds = {}
            for name in ("full", "eek"):
                if name == "eek":
                    eek.patch(model, policy, backend=backend)
                elif eek.is_patched(model):
                    eek.unpatch(model)
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                seconds[name] = time.perf_counter() - start
            if rep >= warmup:
                ratios.append(seconds["eek"] / seconds["full"])
    return ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,32,64")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policy", default="scheduled", help='"scheduled", or a policy, e.g. "Entropy(1e-9)"')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = models.SIZES["small"]
    model = models.build_model("bert", size, args.seq_len, device="cpu", dtype=torch.float32, attn="sdpa")
    print(
        f"bert {size.layers} layers, hidden {size.hidden}, S={args.seq_len}, fp32, {args.threads} thread(s), "
        f"backend {args.backend}, torch {torch.__version__}"
    )
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        pattern = patterns.scheduled(batch, size.layers, 0.0, args.seq_len)
        ids, mask = patterns.make_inputs(pattern, args.seq_len, size.vocab, 0, "cpu")
        policy = eek.Scheduled(pattern.exit_layers) if args.policy == "scheduled" else parse_policy(args.policy)
        ratios = paired_ratios(model, ids, mask, policy, args.backend, args.repeats)
        p20, _, _, p80 = statistics.quantiles(ratios, n=5)
        print(
            f"B={batch} {policy!r:.40}: eek/full p50 {statistics.median(ratios):.3f} (p20 {p20:.3f}, p80 {p80:.3f}), n={len(ratios)}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
