"""``eek`` with ONNX Runtime's layer sessions as they were before issue 79: the server to compare against.

    python benchmarks/profiles/serve_memory_profile.py FOLDER TEXTS --rounds 3 \\
        --setting "shared arena:--dtype int8" "before:--dtype int8|EEK_SESSIONS_BEFORE=1" \\
        --wrapper benchmarks/profiles/ort_sessions_before.py

Everything after ``--`` is ``eek``'s command line, run in this process. With ``EEK_SESSIONS_BEFORE=1``
each :class:`~earlyexit_kernels.engine.ort_layer.OrtLayer` session gets its own CPU arena (extended
to the next power of two) and a memory pattern per input shape, as before; without it, eek runs as
installed. So the two servers of a comparison start the same way and differ in that alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root

import torch  # noqa: E402

from earlyexit_kernels.engine import ort_layer  # noqa: E402


def session_before(self):
    """:meth:`OrtLayer.session` before issue 79: the same options but the memory (``shared_memory=False``)."""
    threads = torch.get_num_threads()
    if self._session is None or self._threads != threads:
        import onnxruntime as ort

        options = ort_layer.session_options(threads, shared_memory=False)
        self._session = ort.InferenceSession(
            self.graph, options, providers=["CPUExecutionProvider"], disabled_optimizers=ort_layer._UNFUSED
        )
        self._threads = threads
    return self._session


def main() -> None:
    if os.environ.get("EEK_SESSIONS_BEFORE") == "1":
        ort_layer.OrtLayer.session = session_before
        print("ONNX Runtime sessions as before issue 79", file=sys.stderr, flush=True)
    from earlyexit_kernels.__main__ import main as eek

    argv = sys.argv[1:]
    eek(argv[argv.index("--") + 1 :] if "--" in argv else argv)


if __name__ == "__main__":
    main()
