"""The re-draw study of the certified paths (benchmarks/statistics/certified_paths_redraw.py) pairs two rules' runs
by draw: runs with the same seed, pool and settings draw the same rows, so each draw's saving against the global
grid under one rule minus the other's is the rules' difference on those rows, with its standard error."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "statistics"))

from certified_paths_redraw import paired_against, render  # noqa: E402


def run(saved: list[float], *, path_rows: int = 800, seed: int = 0, pool_rows: int = 4000) -> dict:
    row = {
        "risk": "agreement",
        "budget": 0.01,
        "confidence": 0.95,
        "calibration_rows": 2000,
        "path_rows": path_rows,
        "seed": seed,
        "draws": len(saved),
        "certified_rate": 0.0,
        "uncertified_rate": 0.5,
        "certified_layers": 3.0,
        "paths": {"marginal": len(saved)},
        "saved_vs_global": sum(saved) / len(saved),
        "saved_vs_global_se": None,
        "draws_worse_than_global": 0,
        "saved_per_draw": saved,
    }
    return {"date": "2026-11-29", "cpu": "a CPU", "command": "x", "seconds": 1.0, "pool_rows": pool_rows, "rows": [row]}


def test_the_savings_pair_by_draw():
    this, other = run([0.3, 0.2, 0.5, 0.1]), run([0.1, 0.2, 0.4, 0.3])
    (gain,) = paired_against(this["rows"], 4000, other)
    # per draw +0.2, 0, +0.1, -0.2: mean +0.025, better on 2 draws, worse on 1
    assert gain["gain"] == pytest.approx(0.025)
    assert gain["gain_se"] == pytest.approx(0.170783 / 2, abs=1e-6)  # the differences' sample sd over sqrt(4)
    assert (gain["draws_better"], gain["draws_worse"]) == (2, 1)
    this["against"] = {"file": "other.json", "note": "the other rule", "rows": [gain]}
    assert "agreement +0.025 ± 0.085 (better on 2 draws, worse on 1)" in render(this)


def test_runs_that_drew_other_rows_are_refused():
    this = run([0.1, 0.2])["rows"]
    for other in (run([0.1, 0.2], path_rows=400), run([0.1, 0.2], seed=1), run([0.1, 0.2], pool_rows=3000)):
        with pytest.raises(SystemExit, match="drew other rows"):
            paired_against(this, 4000, other)
    with pytest.raises(SystemExit, match="no per-draw savings"):
        paired_against(this, 4000, run([0.1, 0.2, 0.3]))
