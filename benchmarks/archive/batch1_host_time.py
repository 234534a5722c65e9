"""Host time a patched model adds at batch size 1, with every encoder layer replaced by an identity (CPU).

Finished investigation: at batch 1 a patched model adds about 24 us per layer of host time (head, rule,
read-back), 3.7% of a layer (docs/benchmarks.md, "Batch size 1").

What is left is the time around the layers: for the unpatched model its embeddings, pooler
and classifier; for the patched one also the exit heads, the rules and their read-backs.
Then the exit step of one layer alone at one row, with the head on torch's BLAS (what the
``cpp`` backend runs on the CPU) and fused into the C++ op (what it runs on CUDA).

    python benchmarks/archive/batch1_host_time.py
"""

from __future__ import annotations

import torch

import earlyexit_kernels as eek
from earlyexit_kernels.backends import cpp_backend
from earlyexit_kernels.backends.write_back import WriteBack
from earlyexit_kernels.bench import models
from earlyexit_kernels.bench.timing import median_us
from earlyexit_kernels.methods.exit_rules import init_state


class _Identity(torch.nn.Module):
    def forward(self, hidden, *args, **kwargs):
        return hidden


def forward_host_time(repeats: int = 300) -> None:
    size = models.SIZES["small"]
    model = models.build_model("bert", size, 128, device="cpu", dtype=torch.float32, attn="sdpa")
    for index in range(len(model.bert.encoder.layer)):
        model.bert.encoder.layer[index] = _Identity()
    ids = torch.randint(5, 90, (1, 128))
    mask = torch.ones(1, 128, dtype=torch.long)
    with torch.inference_mode():
        full = median_us(lambda: model(input_ids=ids, attention_mask=mask), repeats, warmup=20)
        print(f"bert L{size.layers} H{size.hidden}, B = 1, S = 128, identity layers: unpatched {full:.0f} us")
        for policy in (eek.Scheduled([size.layers]), eek.Entropy(1e-9)):
            eek.patch(model, policy, backend="cpp")
            patched = median_us(lambda: model(input_ids=ids, attention_mask=mask), repeats, warmup=20)
            added = patched - full
            print(f"  {policy!r}: {patched:.0f} us, added {added:.0f} us ({added / size.layers:.1f} us per layer)")
            eek.unpatch(model)


def exit_step_time(hidden_size: int = 256, repeats: int = 3000) -> None:
    policy, labels, layers = eek.Entropy(1e-9), 2, 12
    cls = torch.randn(1, hidden_size)
    weights = torch.randn(hidden_size, hidden_size), torch.randn(hidden_size), torch.randn(labels, hidden_size)
    weights = (*weights, torch.randn(labels))
    state = init_state(policy, 1, labels, hidden_size, layers, torch.device("cpu"))
    target = WriteBack(
        *(torch.zeros(1, dtype=torch.long) for _ in range(2)),
        None,
        torch.zeros(1, labels),
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, dtype=torch.long),
    )

    def blas():
        cpp_backend.head_exit_step_write_back(policy, 3, layers, cls, *weights, state, None, target)

    lowered = cpp_backend.lower_policy(policy, layers)

    def fused():
        torch.ops.earlyexit.cpp_head_exit_step(
            cls,
            *weights,
            None,
            [state[k] for k in lowered.state_in],
            *cpp_backend._rule_args(lowered, 3, layers, target),
        )

    with torch.inference_mode():
        print(
            f"exit step of one layer, one row, H = {hidden_size}: head on BLAS + C++ rule + write-back "
            f"{median_us(blas, repeats, warmup=20):.1f} us; fused C++ head and rule {median_us(fused, repeats, warmup=20):.1f} us"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    forward_host_time()
    exit_step_time()
