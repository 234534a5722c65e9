#!/usr/bin/env bash
# The CPU suite of `make test`: one pytest worker per core where pytest-xdist is installed, each
# with its share of the cores as torch threads (two workers of two threads each on two cores
# would spin against each other), whole files to a worker so a module's fixtures are built once;
# then the tests marked `serial` (they time something against the machine) on their own. The 25
# slowest tests are listed at the end (--durations): the suite's 10-minute budget is spent there.
set -euo pipefail
PY=${PY:-.venv/bin/python}
workers=${EEK_TEST_WORKERS:-$(nproc)}
if [[ "$workers" -gt 1 ]] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    "$PY" -m pytest -q python_tests -n "$workers" --dist loadfile -m "not ray and not serial" --durations=25
else
    "$PY" -m pytest -q python_tests -m "not ray and not serial" --durations=25
fi
"$PY" -m pytest -q python_tests -m "serial and not ray"
