"""After a short training on the package's task, each method exits earlier on easy than on hard sequences."""

import pytest
import torch

import earlyexit_kernels as eek
from benchmarks.suite import exit_quality
from earlyexit_kernels.calibration.candidates import candidates
from earlyexit_kernels.calibration.record import replay
from earlyexit_kernels.demo.task import batches, make_split
from earlyexit_kernels.training.calibrate_model import record_exits

LAYERS = 4
# DACT is left out here: its halting head learns to stop where more layers stop paying off, and
# the tiny model of this test never learns the hard sequences (depth does not pay off there), so
# it halts on them early, rightly. The full-size run of `python -m benchmarks.suite.exit_quality`
# (docs/benchmarks.md, "Exit quality") measures DACT's easy and hard exits on a model that learnt them.
METHODS = [m for m in exit_quality.METHODS if m != "dact"]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train = batches(make_split(1024, seed=0), 32, shuffle_seed=0)
    base = exit_quality.train_base(train, seed=0, epochs=3, lr=2e-3, hidden=64, layers=LAYERS)
    test = make_split(512, seed=1)
    return base, train[:16], test


@pytest.mark.parametrize("method", METHODS)
def test_easy_sequences_exit_earlier_than_hard_ones(trained, method):
    base, train, test = trained
    model = exit_quality.train_method(method, base, train, epochs=1, lr=1e-3, heads_lr=3e-3)
    record = record_exits(model, batches(test, 128))
    # the candidate of the method's policy family closest to half the depth
    results = [replay(policy, record) for policy in candidates(record, count=30)]
    result = min(results, key=lambda r: abs(r.layers_run.float().mean().item() - (1 + LAYERS) / 2))
    hard = test["hard"]
    layers = result.layers_run.float()
    assert layers[~hard].mean() < layers[hard].mean(), method
    easy_accuracy = (result.logits.argmax(-1) == test["labels"])[~hard].float().mean()
    assert easy_accuracy > 0.95


def test_readme_table_is_generated_from_the_csv(tmp_path):
    rows = []
    for method in ("pabee", "dact"):
        for k in (1, 2):
            rows.append(
                dict.fromkeys(exit_quality.FIELDS, 0.5)
                | {
                    "method": method,
                    "kind": "static",
                    "policy": f"cut after layer {k}",
                    "mean_layers": k,
                    "beats_static": 0,
                }
            )
        rows.append(
            dict.fromkeys(exit_quality.FIELDS, 0.75)
            | {"method": method, "kind": "curve", "policy": "X", "mean_layers": 1.5, "beats_static": 1}
        )
        rows.append(
            dict.fromkeys(exit_quality.FIELDS, 0.625)
            | {"method": method, "kind": "operating", "policy": "Y", "mean_layers": 1.5, "beats_static": 1}
        )
    csv_path = tmp_path / "q.csv"
    exit_quality.write_csv(rows, str(csv_path), ["--test"])
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{exit_quality.MARK_START}\nold\n{exit_quality.MARK_END}\nend\n")
    exit_quality.main(["--from-csv", str(csv_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "| pabee | `Y` | 62.5% | 62.5% / 62.5% | 1.50 |" in text and "| 1 / 1 |" in text


def test_the_table_prints_each_operating_point_as_rounded_code(tmp_path):
    rows = [
        dict.fromkeys(exit_quality.FIELDS, 0.5)
        | {"method": "smartbert", "kind": "static", "policy": "cut after layer 1", "mean_layers": 1},
        dict.fromkeys(exit_quality.FIELDS, 0.5)
        | {"method": "smartbert", "kind": "operating", "policy": repr(eek.SkipGates(entropy_threshold=0.38741234))},
    ]
    csv_path = tmp_path / "q.csv"
    exit_quality.write_csv(rows, str(csv_path), [])
    assert "| smartbert | `SkipGates(entropy_threshold=0.3874)` |" in exit_quality.readme_table(str(csv_path))


def test_missing_folders_are_made_first_and_rows_are_written_per_method(tmp_path, monkeypatch, capsys):
    trained = []
    real_train_method = exit_quality.train_method

    def train_method(method, *args, **kwargs):
        if trained:  # the second method fails: the first one's rows must already be on disk
            raise KeyboardInterrupt
        trained.append(method)
        return real_train_method(method, *args, **kwargs)

    monkeypatch.setattr(exit_quality, "train_method", train_method)
    output = tmp_path / "new" / "quality.csv"
    plots = tmp_path / "plots" / "per-method"
    argv = ["--output", str(output), "--plot-dir", str(plots), "--methods", "pabee", "deebert"]
    argv += ["--train-size", "64", "--method-train-size", "32", "--val-size", "32", "--test-size", "32"]
    argv += ["--base-epochs", "1", "--hidden", "32", "--layers", "3", "--threads", "1"]
    with pytest.raises(KeyboardInterrupt):
        exit_quality.main(argv)
    assert trained == ["pabee"]
    text = output.read_text()
    assert "\npabee,operating,Patience(" in text and "\ndeebert," not in text
    assert (plots / "pabee.png").stat().st_size > 0


def test_the_bare_command_says_it_keeps_nothing(monkeypatch, capsys):
    monkeypatch.setattr(exit_quality, "run", lambda args, save=None: [])
    exit_quality.main([])
    assert "the results are only printed" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        exit_quality.main(["--readme", "README.md"])  # the table needs a CSV


def test_dact_is_trained_once_per_tau():
    runs = exit_quality.runs_of(["pabee", "dact"], taus=(0.01, 0.1))
    assert runs == [
        ("pabee", "pabee", None),
        ("dact(tau=0.01)", "dact", {"tau": 0.01}),
        ("dact(tau=0.1)", "dact", {"tau": 0.1}),
    ]


def _operating_row(method, label0, label1):
    return dict.fromkeys(exit_quality.FIELDS, 0.5) | {
        "method": method,
        "kind": "operating",
        "policy": "Y",
        "easy_layers_label0": label0,
        "easy_layers_label1": label1,
    }


def test_easy_sequences_exiting_by_label_are_flagged(tmp_path):
    static = dict.fromkeys(exit_quality.FIELDS, 0.5) | {"kind": "static", "policy": "cut after layer 1"}
    rows = [
        static | {"method": "follows_difficulty"},
        _operating_row("follows_difficulty", 2.0, 2.4),  # 0.4 apart: below the half layer
        static | {"method": "follows_label"},
        _operating_row("follows_label", 2.0, 2.6),  # 0.6 apart
    ]
    csv_path = tmp_path / "q.csv"
    exit_quality.write_csv(rows, str(csv_path), [])
    table = exit_quality.readme_table(str(csv_path))
    assert "| 2.00 / 2.40 |" in table
    assert "| 2.00 / 2.60 **label-dependent** |" in table


def test_agreement_on_wrong_answers_of_hard_sequences():
    from earlyexit_kernels.calibration.record import ExitRecord

    right, wrong = [5.0, 0.0], [0.0, 5.0]  # label 0
    # heads 1 and 2 on four hard sequences and one easy one: hard 0 and 1 are wrong at layer 2,
    # and only hard 0 had the same wrong answer at layer 1; the easy one is wrong at both and not counted
    layer1 = [wrong, right, right, wrong, wrong]
    layer2 = [wrong, wrong, right, right, wrong]
    record = ExitRecord(
        all_logits=torch.tensor([layer1, layer2, layer2]),
        labels=torch.zeros(5, dtype=torch.long),
        all_halting_logits=None,
        all_skipped=None,
        policy=eek.Patience(1),
    )
    hard = torch.tensor([True, True, True, True, False])
    assert exit_quality._hard_wrong_agreeing(record, hard) == 0.5
