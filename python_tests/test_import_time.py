"""``import earlyexit_kernels`` and ``python -m earlyexit_kernels --help`` are fast.

Goal: the import costs at most ~1 s beyond ``import torch`` and ``import transformers``,
and ``--help`` at most ~1 s. Other work shares the machine, so a time is held as a ratio to
``import torch`` measured in the same test, each the fastest of a few fresh interpreters.
On the 2-core development machine ``import torch`` takes 1.2-2 s. Measured there: the
import took 4-5 s beyond torch and transformers (ratio about 2.5) while every family's
modeling module and the kernels were imported eagerly, and takes under 0.1 s now
(ratio under 0.1); ``--help`` took about 6 s and takes 0.15 s. The threshold, 0.6, is
about 1 s there, between those.
"""

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.serial  # import times against torch's, on a machine doing nothing else

RATIO = 0.6
RUNS = 2


def _python(code: str) -> float:
    """The number the child prints (seconds it measured)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _fastest(code: str) -> float:
    return min(_python(code) for _ in range(RUNS))


@pytest.fixture(scope="module")
def torch_time() -> float:
    """Seconds ``import torch`` takes in a fresh interpreter (the fastest of RUNS)."""
    return _fastest("import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)")


def test_import_does_not_load_torch_transformers_or_the_kernels():
    code = (
        "import sys; import earlyexit_kernels; "
        "print(sum(m in sys.modules for m in ('torch', 'transformers', 'triton', 'earlyexit_kernels._C')))"
    )
    assert _python(code) == 0


def test_import_costs_little_beyond_torch_and_transformers(torch_time):
    code = (
        "import time; import torch, transformers; t = time.perf_counter(); "
        "import earlyexit_kernels as eek; eek.Entropy; print(time.perf_counter() - t)"
    )
    assert _fastest(code) <= RATIO * torch_time


def test_help_is_fast(torch_time):
    def wall() -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "earlyexit_kernels", "--help"], capture_output=True, check=True)
        return time.perf_counter() - start

    assert min(wall() for _ in range(RUNS)) <= RATIO * torch_time
