"""The heap recorder of the soak profile (benchmarks/profiles/heap_snapshots.py) and the soak table's renderer.

A snapshot names a container that grows between two readings, counts the objects by type, the
tensors alive and, with tracemalloc, the line whose allocations grew; the summary renders each
reading; the soak renderer gives each setting's median over its rounds and the change of resident
memory.
"""

import json
import time
import tracemalloc

import pytest
import torch

from benchmarks.profiles import heap_snapshots
from benchmarks.profiles.serve_memory_profile import END, START, render

KEPT: list = []


def test_a_snapshot_passes_over_a_weak_proxy_whose_object_has_died():
    """gc lists weak proxies; reading a dead one's class raises ReferenceError (CI failed on one)."""
    import weakref

    class Gone:
        pass

    alive = Gone()
    dead = weakref.proxy(alive)
    del alive
    KEPT.append(dead)
    try:
        reading = heap_snapshots.snapshot(time.perf_counter(), None)
    finally:
        KEPT.clear()
    assert reading["objects"] > 0


def test_a_snapshot_shows_a_container_that_grows_and_the_line_that_grew_it(tmp_path):
    tracemalloc.start(1)
    try:
        traced: list = []
        began = time.perf_counter()
        first = heap_snapshots.snapshot(began, traced)
        kept_tensor = torch.zeros(1024, 1024)  # 4 MiB, alive at the second reading
        KEPT.extend(str(i) for i in range(100_000))  # a structure that grows with "traffic", the longest here
        second = heap_snapshots.snapshot(began, traced)
    finally:
        tracemalloc.stop()
        KEPT.clear()
    assert [100_000, "list[str]"] in second["largest_containers"]
    assert second["tensor_mib"] >= first["tensor_mib"] + 3.9 and second["tensors"] >= 1
    grown = second["grown_since_last_kib"]
    assert any("test_heap_snapshots.py" in where and kib > 100 for where, kib, _ in grown)
    (tmp_path / "heap.jsonl").write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n")
    table = heap_snapshots.summary(tmp_path / "heap.jsonl")
    assert table.count("\n") == 4 and f"({second['tensor_mib']})" in table  # a row a reading
    del kept_tensor


def _soak(setting: str, rate: float, first: float, last: float, round_: int) -> dict:
    samples = [{"t": 0.0, "total": first, "in_use": 200.0}, {"t": 300.0, "total": last, "in_use": 201.0}]
    change = round(100 * (last - first) / first, 1)
    return {"round": round_, "setting": setting, "texts_per_s": rate, "change_pct": change,
            "largest_deviation_pct": abs(change), "samples": samples}  # fmt: skip


def test_the_soak_table_gives_each_setting_s_median_over_its_rounds():
    record = {
        "date": "2026-11-27", "cpu": "AMD EPYC", "concurrency": 32, "seconds": 300.0, "every": 10.0, "warmup": 30.0,
        "label": "MiniLM-L6 int8", "folder": "F", "command": ["F", "T", "--rounds", "3"],
        "results": [_soak("a", 100.0, 700.0, 707.0, 1), _soak("b", 90.0, 800.0, 880.0, 1),
                    _soak("b", 94.0, 800.0, 840.0, 2), _soak("a", 104.0, 700.0, 714.0, 2),
                    _soak("a", 102.0, 700.0, 721.0, 3), _soak("b", 92.0, 800.0, 860.0, 3)],
    }  # fmt: skip
    table = render([record])
    assert table.startswith(START) and table.rstrip().endswith(END)
    row_a = next(line for line in table.splitlines() if line.startswith("| MiniLM-L6 int8 | a |"))
    assert "| 300 s after 30 s | 3 | 102.0 [100 to 104] | 700 to 714 | +2.0% [1 to 3] | 3.0% |" in row_a
    row_b = next(line for line in table.splitlines() if line.startswith("| MiniLM-L6 int8 | b |"))
    assert "| 300 s after 30 s | 3 | 92.0 [90 to 94] | 800 to 860 | +7.5% [5 to 10] | 10.0% |" in row_b
    assert "`python benchmarks/profiles/serve_memory_profile.py F T --rounds 3`" in table


if __name__ == "__main__":
    pytest.main([__file__])
