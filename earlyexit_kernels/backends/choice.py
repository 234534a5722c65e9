"""How ``backend="auto"`` chooses between fast backends: by timing them on this machine.

On a GPU both the Triton kernels and the CUDA C++ kernels can serve a model; which is
faster depends on the GPU, the dtype and the hidden size. The first time "auto" meets
a (device, dtype, hidden size, labels) combination with more than one candidate, it
times one layer's bookkeeping on each: the fused head + exit step + write-back and the
compaction gather of half the rows at S = 128, at each batch size of ``TIMED_BATCHES``
(a batch of 256 whose active rows shrink to 64 and 16 as sequences exit), and keeps the
backend with the smallest sum for the rest of the process; :func:`auto_choices` shows what
was measured. Timing at 64 rows only missed the crossover: the CUDA head (8 rows per block
on CUDA cores, W_p read n/8 times) can win at 64 rows and lose to Triton's tensor-core head
at 256.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import torch

from earlyexit_kernels.backends.write_back import WriteBack, write_back
from earlyexit_kernels.methods.exit_rules import init_state
from earlyexit_kernels.methods.policies import Entropy

__all__ = ["auto_choices", "choose", "sequence_seconds", "step_seconds", "TIMED_BATCHES"]

ChoiceKey = tuple[str, str, int, int]  # device, dtype, hidden size, labels

_CHOICES: dict[ChoiceKey, tuple[str, dict[str, float]]] = {}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(
    backend,
    device: torch.device,
    dtype: torch.dtype,
    hidden_size: int,
    num_labels: int,
    *,
    batch: int = 64,
    seq_len: int = 128,
    repeats: int = 20,
) -> float:
    """Median seconds of one layer's bookkeeping on ``backend`` (warm, synchronized)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hidden = rand(batch, seq_len, hidden_size)
    weights = (
        rand(hidden_size, hidden_size, scale=hidden_size**-0.5),
        rand(hidden_size),
        rand(num_labels, hidden_size, scale=hidden_size**-0.5),
        rand(num_labels),
    )
    mask = torch.ones(batch, seq_len, dtype=torch.long, device=device)
    keep = torch.arange(0, batch, 2, device=device)
    policy = Entropy(0.5 * math.log(max(num_labels, 2)))
    layers = 12

    # The step returns a new state and writes the same values each time: both are reused.
    state = init_state(policy, batch, num_labels, hidden_size, layers, device, pooled_dtype=dtype)
    target = WriteBack(
        torch.arange(batch, device=device),
        torch.ones(batch, dtype=torch.long, device=device),
        None,
        torch.zeros(batch, num_labels, dtype=dtype, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
        torch.zeros(batch, dtype=torch.long, device=device),
    )

    def one_layer():
        if backend.head_exit_step_write_back is not None:
            backend.head_exit_step_write_back(policy, 1, layers, hidden[:, 0], *weights, state, None, target)
        else:  # as the engine runs a backend without a fused head
            logits = torch.nn.functional.linear(
                torch.tanh(torch.nn.functional.linear(hidden[:, 0], *weights[:2])), *weights[2:]
            )
            exits, returned, _ = backend.exit_step(policy, 1, layers, logits, None, state)
            write_back(target, exits, returned, 1)
        backend.compact(hidden, mask, keep, seq_len)

    for _ in range(3):  # compiles the kernels
        one_layer()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        one_layer()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


#: The batch sizes "auto" times each candidate at (one layer at each).
TIMED_BATCHES = (256, 64, 16)


def sequence_seconds(backend, device: torch.device, dtype: torch.dtype, hidden_size: int, num_labels: int) -> float:
    """Seconds of one layer's bookkeeping at each batch size of ``TIMED_BATCHES``, summed."""
    return sum(step_seconds(backend, device, dtype, hidden_size, num_labels, batch=batch) for batch in TIMED_BATCHES)


def choose(candidates: list, key: ChoiceKey, measure: Callable[..., float] = sequence_seconds):
    """The candidate with the smallest ``measure``; measured once per ``key`` and process.

    A candidate whose measurement fails counts as infinitely slow (with a warning). The
    answer is None, and nothing is kept, when every measurement fails (it may be passing,
    such as running out of memory) or when the stream is being captured into a CUDA graph,
    where timing is impossible; the caller then takes its static order.
    """
    by_name = {backend.name: backend for backend in candidates}
    if key not in _CHOICES:
        device, dtype = torch.device(key[0]), getattr(torch, key[1])
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        seconds = {}
        for name, backend in by_name.items():
            try:
                seconds[name] = measure(backend, device, dtype, key[2], key[3])
            except Exception as err:  # a backend that cannot run here must not break "auto"
                warnings.warn(f"earlyexit_kernels: backend {name!r} failed while timed for 'auto': {err}", stacklevel=2)
                seconds[name] = math.inf
        fastest = min(seconds, key=seconds.get)
        if not math.isfinite(seconds[fastest]):
            return None
        _CHOICES[key] = (fastest, seconds)
    return by_name[_CHOICES[key][0]]


def auto_choices() -> dict[ChoiceKey, tuple[str, dict[str, float]]]:
    """What "auto" measured so far: ``{(device, dtype, H, C): (chosen, {backend: seconds})}``."""
    return dict(_CHOICES)
