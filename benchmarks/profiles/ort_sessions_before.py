"""``eek`` with ONNX Runtime's layer sessions as they were before issue 79: the server to compare against.

    python benchmarks/profiles/serve_memory_profile.py FOLDER TEXTS --rounds 3 \\
        --setting "shared arena:--dtype int8" "before:--dtype int8|EEK_SESSIONS_BEFORE=1" \\
        --wrapper benchmarks/profiles/ort_sessions_before.py

Everything after ``--`` is ``eek``'s command line, run in this process. With ``EEK_SESSIONS_BEFORE=1``
each :class:`~earlyexit_kernels.engine.layers.ort_layer.OrtLayer` session gets its own CPU arena (extended
to the next power of two) and a memory pattern per input shape, as before; without it, eek runs as
installed. So the two servers of a comparison start the same way and differ in that alone.
``EEK_ARENA_SHRINK=off`` leaves out the memory trim's shrink of the arena (``ort_layer.request_arena_shrink``),
the server before that change.
``EEK_ARENA_CFG=arena_extend_strategy=N`` registers the one shared arena with that strategy instead of
:data:`~earlyexit_kernels.engine.layers.ort_layer.ARENA_EXTEND_STRATEGY` (0, the next power of two):
``EEK_ARENA_CFG=arena_extend_strategy=1`` is the server before that default, its regions grown by exactly
what a call asked.
``EEK_SESSIONS=shared-patterns`` (the one arena, with a pattern per shape) and ``EEK_SESSIONS=own-no-patterns``
(an arena each, no patterns) take the two changes apart: the A/B of
``benchmarks/results/amd_epyc/memory_soak_cpu/minilm_int8_sessions_ab.json`` ran an uncommitted script that built
these same sessions (``/tmp/ortexp.py``: ``EXP_SHARED_ARENA=1`` and ``EXP_MEM_PATTERN=0``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root

import torch  # noqa: E402

from earlyexit_kernels.engine.layers import ort_layer  # noqa: E402


def session_before(self):
    """:meth:`OrtLayer.session` before issue 79, or one of its two changes alone (``EEK_SESSIONS``)."""
    threads = torch.get_num_threads()
    if self._session is None or self._threads != threads:
        import onnxruntime as ort

        variant = os.environ.get("EEK_SESSIONS", "before")
        options = ort_layer.session_options(threads, shared_memory=variant == "shared-patterns")
        options.enable_mem_pattern = variant != "own-no-patterns"
        self._session = ort.InferenceSession(
            self.graph, options, providers=["CPUExecutionProvider"], disabled_optimizers=ort_layer._UNFUSED
        )
        self._threads = threads
    return self._session


def main() -> None:
    if os.environ.get("EEK_ARENA_CFG"):
        entries = {k: int(v) for k, v in (item.split("=") for item in os.environ["EEK_ARENA_CFG"].split(","))}
        if set(entries) != {"arena_extend_strategy"}:
            raise SystemExit(f"EEK_ARENA_CFG sets arena_extend_strategy only; got {sorted(entries)}")
        ort_layer.ARENA_EXTEND_STRATEGY = entries["arena_extend_strategy"]  # read when the arena is registered
        print(f"ONNX Runtime's shared arena: {entries}", file=sys.stderr, flush=True)
    if os.environ.get("EEK_ARENA_SHRINK") == "off":  # the memory trim's arena shrink (issue 79) left out
        ort_layer.request_arena_shrink = lambda: None
        print("ONNX Runtime's arena: never shrunk", file=sys.stderr, flush=True)
    variant = os.environ.get("EEK_SESSIONS", "before" if os.environ.get("EEK_SESSIONS_BEFORE") == "1" else None)
    if variant is not None:
        if variant not in ("before", "shared-patterns", "own-no-patterns"):
            raise SystemExit(f"EEK_SESSIONS must be before, shared-patterns or own-no-patterns; got {variant!r}")
        os.environ["EEK_SESSIONS"] = variant
        ort_layer.OrtLayer.session = session_before
        print(f"ONNX Runtime sessions: {variant}", file=sys.stderr, flush=True)
    from earlyexit_kernels.__main__ import main as eek

    argv = sys.argv[1:]
    eek(argv[argv.index("--") + 1 :] if "--" in argv else argv)


if __name__ == "__main__":
    main()
