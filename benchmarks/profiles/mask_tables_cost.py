"""The host time of the ONNX Runtime layer's key mask and token positions, per layer call (issue 78 item 3).

A call of 8 rows of 40 tokens (30 real), the 4-D boolean mask a layer takes: worked out at every layer
(``_key_mask`` and ``np.flatnonzero``, as before) against ``_mask_tables`` (once for the mask the call's layers
share). Best of 5 times 20,000 calls, one thread. REPO: the checkout to import (a worktree of another commit)::

    flock -x /tmp/eek-cpu.lock python benchmarks/profiles/mask_tables_cost.py [REPO]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from earlyexit_kernels.engine.layers import ort_layer  # noqa: E402

ROWS, LENGTH, REAL = 8, 40, 30


def main() -> None:
    torch.set_num_threads(1)
    mask = torch.ones(ROWS, LENGTH, dtype=torch.bool)
    mask[:, REAL:] = False
    layer_mask = mask[:, None, None, :].expand(ROWS, 1, LENGTH, LENGTH)
    tables = getattr(ort_layer, "_mask_tables", None)

    def once():
        if tables is not None:
            return tables(layer_mask, ROWS, LENGTH)
        key_mask = ort_layer._key_mask(layer_mask, ROWS, LENGTH)
        return key_mask, torch.from_numpy(np.flatnonzero(key_mask))

    for _ in range(2000):
        once()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(20000):
            once()
        times.append((time.perf_counter() - start) / 20000 * 1e6)
    how = "once per shared mask" if tables is not None else "at every layer"
    print(f"{min(times):.2f} us a layer call, {how} ({ort_layer.__file__})")


if __name__ == "__main__":
    main()
