"""``benchmarks/profiles/interleaved_ab.py``'s arithmetic: each pair's change, the median's interval as
the sign test gives it, and how many pairs went each way."""

import importlib.util
import math
import random
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "profiles" / "interleaved_ab.py"
_spec = importlib.util.spec_from_file_location("interleaved_ab", _PATH)
interleaved_ab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(interleaved_ab)


def test_the_median_s_interval_is_the_sign_test_s():
    values = list(range(20))
    random.Random(0).shuffle(values)
    # 20 pairs: P(Binomial(20, 1/2) <= 5) = 0.021 <= 0.025 < P(<= 6) = 0.058, so the 6th and 15th values
    assert interleaved_ab.median_interval(values) == (5, 14)
    tail = sum(math.comb(20, i) for i in range(6)) / 2**20
    assert 1 - 2 * tail >= 0.95
    # 6 pairs: only the extremes (P(0 of 6) = 0.016); 5 pairs cannot reach 95% (P(0 of 5) = 0.031): the range
    assert interleaved_ab.median_interval([3, 1, 2, 6, 5, 4]) == (1, 6)
    assert interleaved_ab.median_interval([3, 1, 2, 5, 4]) == (1, 5)


def test_the_pairs_are_summed_up_in_percent():
    out = interleaved_ab.summary([0.02, -0.01, 0.03, 0.0, 0.01, -0.02])
    assert out["pairs"] == 6 and out["faster_pairs"] == 3 and out["slower_pairs"] == 2
    assert out["median_change_pct"] == pytest.approx(0.5)
    assert out["median_95_pct"] == [-2.0, 3.0]
    assert out["mean_change_pct"] == pytest.approx(0.5)


def test_a_recorded_run_gives_back_its_pairs_changes_in_order():
    record = {
        "settings": ["new:--dtype int8", "old:--dtype int8|EEK_ARENA_CFG=arena_extend_strategy=1"],
        "blocks": [
            {"pair": 1, "server": "new", "texts_per_s": 110.0},
            {"pair": 1, "server": "old", "texts_per_s": 100.0},
            {"pair": 2, "server": "old", "texts_per_s": 100.0},  # B A: the baseline first
            {"pair": 2, "server": "new", "texts_per_s": 95.0},
        ],
    }
    assert interleaved_ab.recorded_changes(record) == pytest.approx([0.10, -0.05])
