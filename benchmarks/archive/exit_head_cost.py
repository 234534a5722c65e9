"""What an internal exit head costs per choice of ``pooling`` and ``head`` (CPU), beside one encoder layer.

Finished investigation: the masked mean, not the MLP, was the head's cost (1.2% of a layer against 0.2% for
[CLS]); fused into the cpp step since (docs/architecture.md, "Exit heads: what is fused and what it costs").

A random MiniLM-L6-shaped BERT (hidden 384, 12 heads, feed-forward 1536, 6 layers, 2 labels),
a batch of ``--batch`` sequences of ``--length`` tokens (a quarter of them half padded). For
each choice and backend it times one call of the engine's head-and-exit step on a layer's
output (``batch_loop.head_and_exit_step``, Entropy, fused where the engine fuses it: ``step`` is
the cpp backend's whole per-layer step, pooling included, in one op) and one encoder layer,
median of ``--repeats`` calls.

    python benchmarks/archive/exit_head_cost.py [--batch 32] [--length 128] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification

import earlyexit_kernels as eek
from earlyexit_kernels.backends.registry import resolve_backend
from earlyexit_kernels.bench.timing import median_us
from earlyexit_kernels.engine.step.batch_loop import can_fuse_head, head_and_exit_step, pooled_exit_heads
from earlyexit_kernels.engine.step.start_state import head_state
from earlyexit_kernels.methods.exit_rules import init_state
from earlyexit_kernels.patching.patch import current_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    model = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    hidden = torch.randn(args.batch, args.length, 384)
    mask = torch.ones(args.batch, args.length, dtype=torch.long)
    mask[: args.batch // 4, args.length // 2 :] = 0
    eek.patch(model, eek.Entropy(0.3))
    adapter = current_adapter(model)
    layer_mask = adapter.layer_mask(mask, hidden.dtype)
    with torch.no_grad():
        layer_us = median_us(lambda: adapter.run_layer(0, hidden, layer_mask), max(args.repeats // 5, 5))
    print(f"B={args.batch} S={args.length} H=384, {args.threads} threads; one encoder layer: {layer_us:.0f} us")
    print(f"{'pooling':8} {'head':8} {'backend':8} {'fused':6} {'head+exit step (us)':>20} {'% of a layer':>13}")
    for pooling in ("cls", "mean"):
        for head in ("model", "mlp", "cascade"):
            eek.patch(model, eek.Entropy(0.3), pooling=pooling, head=head)
            adapter = current_adapter(model)
            for backend_name in ("torch", "cpp"):
                if not eek.backends()[backend_name]:
                    continue
                backend = resolve_backend(backend_name, hidden.device, dtype=hidden.dtype)
                policy = eek.policy_of(model)

                def step(adapter=adapter, backend=backend, policy=policy):
                    state = init_state(policy, args.batch, 2, 384, 6, hidden.device, pooled_dtype=hidden.dtype)
                    state.update(head_state(adapter, args.batch, 2, hidden.device))  # the cascade's logits below
                    fused = can_fuse_head(backend, adapter)
                    pooled = pooled_exit_heads(backend, adapter, hidden.device, fused)
                    return head_and_exit_step(
                        adapter,
                        backend,
                        policy,
                        2,
                        hidden,
                        None,
                        state,
                        fused=fused,
                        mask=mask,
                        pooled_head=pooled[1] if pooled is not None else None,
                    )

                with torch.no_grad():
                    fused = can_fuse_head(backend, adapter)
                    if pooled_exit_heads(backend, adapter, hidden.device, fused) is not None:
                        fused = "step"  # pooling, head and rule in one op
                    us = median_us(step, args.repeats)
                print(f"{pooling:8} {head:8} {backend_name:8} {str(fused):6} {us:20.0f} {100 * us / layer_us:12.1f}%")


if __name__ == "__main__":
    main()
