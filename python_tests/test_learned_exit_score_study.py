"""The learned exit score study (issue 108) reads the certified-exits benchmark's rows: which row, and where its
fit and records are cached. The study itself needs the real fine-tuned classifiers (minutes to hours on a CPU), so
it is run by hand (benchmarks/README.md); these check what decides which rows it reads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "learned_exit_score_study.py"


@pytest.fixture(scope="module")
def study():
    pytest.importorskip("sklearn", reason="the study's learned scores are scikit-learn models")
    spec = importlib.util.spec_from_file_location("learned_exit_score_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_each_row_the_study_reads_has_its_own_cache_and_the_first_keeps_its_old_name(study):
    rows = [
        study.TaskRow(),
        study.TaskRow("benchmark"),
        study.TaskRow("benchmark", "mpnet"),
        *(study.TaskRow("benchmark", backbone, study.SUBSET_SETTINGS[0]) for backbone in ("minilm", "mpnet")),
    ]
    names = [study._cache_name(row) for row in rows]
    assert names == ["", "_benchmark", "_benchmark_mpnet", "_benchmark_first6000", "_benchmark_mpnet_first6000"]
    assert [row.fine_tuning_rows for row in rows] == [None, None, None, 6000, 6000]


def test_the_6000_row_setting_is_the_benchmark_s_own(study):
    from benchmarks.quality import certified_exits_real

    assert study.BENCHMARK_SETTINGS == (
        "train + validation file",
        "6,000 fine-tuning rows + validation file",
    )
    assert set(study.BENCHMARK_SETTINGS) <= set(certified_exits_real.SETTINGS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--setting", "6,000 fine-tuning rows + validation file"], "--setting picks the benchmark's row"),
        (["--backbone", "mpnet"], "--backbone picks the benchmark's row"),
        (["--from-folder", "somewhere"], "--from-folder stands for the benchmark row's fit"),
    ],
)
def test_a_benchmark_option_without_the_benchmark_source_is_refused_before_any_work(study, argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        study.main(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
