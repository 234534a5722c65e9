"""The host time of one layer's pooled exit head step, made at every call against prepared once (issue 78 item 3).

MiniLM-L6's shapes (H = M = 384, two labels, a mean-pooled MLP head) on 4 rows of 40 tokens, one thread: the
step as the engine called it before (``cpp_backend.pooled_head_exit_step``: the policy lowered, the head's
tensors checked and looked up, the rule's arguments built, at every call), the prepared step
(``prepare_pooled_head_exit_step``: all of that once), and the C++ op alone with its arguments ready. Best of 5
times 5,000 calls. REPO: the checkout to import (a worktree of another commit, for before and after)::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/prepared_step_cost.py [REPO]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from earlyexit_kernels.backends import cpp_backend  # noqa: E402
from earlyexit_kernels.backends.pooled_head import FusedExitHead  # noqa: E402
from earlyexit_kernels.methods.policies import Entropy  # noqa: E402

H, M, C, ROWS, LENGTH, LAYERS = 384, 384, 2, 4, 40, 6


def best_microseconds(call, repeats: int = 5, calls: int = 5000) -> float:
    for _ in range(calls // 2):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return min(times)


def main() -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    head = FusedExitHead(
        "mean",
        torch.randn(M, H, generator=g) * 0.05,
        torch.zeros(M),
        "gelu",
        torch.randn(C, M, generator=g) * 0.05,
        torch.zeros(C),
        torch.ones(H),
        torch.zeros(H),
    )
    policy = Entropy((0.18, 0.25, 0.41, 0.57, 0.64, 0))
    hidden, mask = torch.randn(ROWS, LENGTH, H, generator=g), torch.ones(ROWS, LENGTH, dtype=torch.bool)
    lowered = cpp_backend.lower_policy(policy, LAYERS)
    op_args = (
        hidden,
        mask,
        1,
        head.norm_weight,
        head.norm_bias,
        1e-5,
        cpp_backend.transposed_pooler(head.dense_weight),
    )
    op_args += (
        head.dense_bias,
        1,
        head.out_weight,
        head.out_bias,
        None,
        [],
        *cpp_backend._rule_args(lowered, 2, LAYERS, None),
    )
    op = torch.ops.earlyexit.cpp_pooled_head_exit_step
    with torch.no_grad():
        each = best_microseconds(lambda: cpp_backend.pooled_head_exit_step(policy, 2, LAYERS, hidden, mask, head, {}))
        line = f"made at every call {each:.1f} us"
        prepare = getattr(cpp_backend, "prepare_pooled_head_exit_step", None)
        if prepare is not None:
            step = prepare(policy, 2, LAYERS, head)
            line += f", prepared {best_microseconds(lambda: step(hidden, mask, {})):.1f} us"
        line += f", the op alone {best_microseconds(lambda: op(*op_args)):.1f} us"
    print(f"{line} ({ROWS} rows x {LENGTH} tokens, H = M = {H}; {cpp_backend.__file__})")


if __name__ == "__main__":
    main()
