"""Is the served process's growing memory live, or free memory its allocator holds? (issue 64, item 3)

The server's load without HTTP: ``--clients`` threads each submit one text at a time to a
:class:`~earlyexit_kernels.engine.entry.background.BackgroundEngine` (one torch thread, as ``eek serve``
runs under the serving benchmark), with ``eek serve``'s memory trim running every ``--trim``
seconds. Every 10 s: texts answered, resident memory (``VmRSS``), glibc's own account of its heap
(``mallinfo2``: the heap's size, the bytes in use, the free bytes it holds, what is ``mmap``'d),
the Python-visible tensors, and with ``--trim-at-sample`` the resident memory right after one
more ``malloc_trim(0)``. glibc's settings come from its environment (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_ARENA_MAX``)::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/engine_memory_profile.py FOLDER TEXTS.txt --seconds 150
    MALLOC_MMAP_THRESHOLD_=131072 flock -x /tmp/eek-cpu.lock python benchmarks/profiles/engine_memory_profile.py ...

Found (2026-11-26, AMD EPYC, MiniLM-L6's demo folder; benchmarks/results/amd_epyc/serve_memory_profile_cpu.md):
the bytes in use stay near 200 MiB while the heap's free bytes grow from 236 to 549 MiB; a trim
right after each sample brings resident memory back within 6% of its first reading. The growth is free
memory the allocator keeps touching between two trims, not memory the engine holds.
"""

import argparse
import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import torch

from earlyexit_kernels.engine.entry.background import BackgroundEngine
from earlyexit_kernels.integrations.model_folder import load_model
from earlyexit_kernels.integrations.server.memory_trim import heap_account, start_memory_trim


def resident_mib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) // 1024


def tensor_mib() -> int:
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]
    return sum(t.numel() * t.element_size() for t in tensors) >> 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("texts", type=Path, help="one text per line")
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--trim", type=float, default=10.0, help="the trim's interval (0: off)")
    parser.add_argument("--trim-at-sample", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    model, tokenizer = load_model(str(args.folder), None, None)
    texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
    encoded = [tokenizer(text, truncation=True) for text in texts]
    sequences = [
        (torch.tensor(e["input_ids"]), torch.tensor(e.get("token_type_ids", [0] * len(e["input_ids"]))))
        for e in encoded
    ]
    worker = BackgroundEngine(model, max_batch_size=32, max_queue=4096)
    trim = start_memory_trim(args.trim)
    print(trim.line, "| environment:", {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")})
    stop = time.perf_counter() + args.seconds
    answered = [0]

    def client(first: int) -> None:
        index = first
        while time.perf_counter() < stop:
            worker.submit(*sequences[index % len(sequences)]).result()
            answered[0] += 1
            index += args.clients

    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    for thread in clients:
        thread.start()
    began = time.perf_counter()
    print(
        "| s | texts | texts/s | RSS MiB | heap MiB | in use MiB | free MiB | mmap'd MiB | tensors MiB | RSS after a trim |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    while time.perf_counter() < stop - 5:
        time.sleep(10)
        now, resident, info = time.perf_counter() - began, resident_mib(), heap_account()
        after = ""
        if args.trim_at_sample:
            libc.malloc_trim(0)
            after = resident_mib()
        print(
            f"| {now:.0f} | {answered[0]} | {answered[0] / now:.0f} | {resident} | {info['heap'] >> 20} "
            f"| {info['in_use'] >> 20} | {info['free'] >> 20} | {info['mapped'] >> 20} | {tensor_mib()} | {after} |",
            flush=True,
        )
    for thread in clients:
        thread.join()
    worker.close()
    time.sleep(max(args.trim, 1.0) + 1)
    print(f"idle after the load, one trim later: RSS {resident_mib()} MiB")
    trim.stop()


if __name__ == "__main__":
    main()
