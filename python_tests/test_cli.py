"""``python -m earlyexit_kernels classify MODEL INPUT OUTPUT``: files in, files out, resumable, clear errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import word_texts
from transformers import BertTokenizerFast

import earlyexit_kernels as eek
from earlyexit_kernels.cli import main
from earlyexit_kernels.policy_spec import parse_policy

pd = pytest.importorskip("pandas", reason="the command line reads and writes tables through pandas and pyarrow")
pytest.importorskip("pyarrow", reason="the command line reads and writes tables through pyarrow")

FORMATS = ("csv", "tsv", "jsonl", "parquet")


def _write(frame, path: Path):
    kind = path.suffix[1:]
    if kind in ("csv", "tsv"):
        frame.to_csv(path, index=False, sep="\t" if kind == "tsv" else ",")
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return str(path)


def _read(path: Path):
    kind = path.suffix[1:]
    if kind in ("csv", "tsv"):
        return pd.read_csv(path, sep="\t" if kind == "tsv" else ",", keep_default_na=False, dtype={"text": str})
    if kind == "jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


def _expected(model_dir, texts, pairs=None):
    model = eek.from_pretrained(model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    rows = []
    for i, text in enumerate(texts):
        with torch.no_grad():
            out = model(**tokenizer(*((text, pairs[i]) if pairs else (text,)), return_tensors="pt"))
        probabilities = out.logits[0].softmax(-1)
        rows.append(
            (model.config.id2label[int(probabilities.argmax())], float(probabilities.max()), int(out.exit_layer))
        )
    return rows


def _run(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("kind_in, kind_out", [(k, k) for k in FORMATS] + [("csv", "parquet"), ("parquet", "jsonl")])
def test_every_row_gets_the_model_s_own_answer(saved_classifier, tmp_path, kind_in, kind_out):
    texts = word_texts(120, seed=1)
    source = _write(pd.DataFrame({"id": range(120), "text": texts}), tmp_path / f"in.{kind_in}")
    target = tmp_path / f"out.{kind_out}"
    assert _run("classify", saved_classifier, source, target, "--chunk-rows", 32) == 0
    out = _read(target)
    assert list(out.columns) == ["id", "text", "label", "score", "exit_layer", "layers_run"]
    assert [int(i) for i in out.id] == list(range(120))
    for (label, score, exit_layer), row in zip(_expected(saved_classifier, texts), out.itertuples()):
        assert row.label == label and row.exit_layer == exit_layer == row.layers_run
        assert row.score == pytest.approx(score, abs=1e-6)
    assert out.exit_layer.nunique() >= 2
    assert not Path(str(target) + ".eek-progress.json").exists()


def test_text_pairs(saved_classifier, tmp_path):
    first, second = word_texts(20, seed=4), word_texts(20, seed=5)
    source = _write(pd.DataFrame({"q": first, "d": second}), tmp_path / "in.jsonl")
    _run("classify", saved_classifier, source, tmp_path / "out.jsonl", "--text-column", "q", "--pair-column", "d")
    out = _read(tmp_path / "out.jsonl")
    assert [tuple(r) for r in out[["label", "exit_layer"]].itertuples(index=False)] == [
        (label, exit_layer) for label, _, exit_layer in _expected(saved_classifier, first, second)
    ]


def test_a_plain_classifier_needs_a_policy(saved_classifier, tmp_path):
    plain = tmp_path / "plain"
    model = eek.from_pretrained(saved_classifier)
    eek.unpatch(model).save_pretrained(plain)
    BertTokenizerFast.from_pretrained(saved_classifier).save_pretrained(plain)
    source = _write(pd.DataFrame({"text": word_texts(10)}), tmp_path / "in.csv")
    assert _run("classify", plain, source, tmp_path / "a.csv") == 2
    assert _run("classify", plain, source, tmp_path / "b.csv", "--policy", "Patience(2)") == 0
    assert set(_read(tmp_path / "b.csv").exit_layer) <= {3, 4}  # Patience(2) leaves at layer 3 at the earliest


def test_empty_and_null_texts_are_classified_as_empty_and_named(saved_classifier, tmp_path, capsys):
    source = _write(pd.DataFrame({"text": ["w1 w2", None, "", "w3"]}), tmp_path / "in.jsonl")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 0
    out = _read(tmp_path / "out.csv")
    assert len(out) == 4 and out.exit_layer[1] == out.exit_layer[2]
    err = capsys.readouterr().err
    assert "2 rows have an empty or null text" in err and "(rows 1, 2;" in err


def _interrupt_after(monkeypatch, chunks):
    """Make the writer die after ``chunks`` chunks, as a killed run would."""
    from earlyexit_kernels import table_io

    write = table_io.ChunkWriter.write
    calls = {"n": 0}

    def dying(self, frame):
        if calls["n"] == chunks:
            raise KeyboardInterrupt
        calls["n"] += 1
        write(self, frame)

    monkeypatch.setattr(table_io.ChunkWriter, "write", dying)


@pytest.mark.parametrize("kind", FORMATS)
def test_resume_after_an_interruption_loses_and_repeats_no_row(saved_classifier, tmp_path, monkeypatch, kind):
    texts = word_texts(300, seed=6)
    source = _write(pd.DataFrame({"id": range(300), "text": texts}), tmp_path / f"in.{kind}")
    whole, cut = tmp_path / f"whole.{kind}", tmp_path / f"cut.{kind}"
    assert _run("classify", saved_classifier, source, whole, "--chunk-rows", 40) == 0

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert _run("classify", saved_classifier, source, cut, "--chunk-rows", 40) == 130
    # A chunk half written when the run was killed:
    if kind == "parquet":
        (tmp_path / f"cut.{kind}.eek-parts" / ".part-000003.parquet.tmp").write_bytes(b"PAR1 half a file")
    else:
        with open(cut, "ab") as file:
            file.write(b'"301","w1 w2","pos",0.5')
    assert _run("classify", saved_classifier, source, cut, "--chunk-rows", 40, "--resume") == 0
    if kind == "parquet":
        pd.testing.assert_frame_equal(_read(cut), _read(whole))
    else:
        assert cut.read_bytes() == whole.read_bytes()


def test_resume_after_a_real_kill(saved_classifier, tmp_path):
    texts = word_texts(2000, seed=7)
    source = _write(pd.DataFrame({"id": range(2000), "text": texts}), tmp_path / "in.csv")
    whole, cut = tmp_path / "whole.csv", tmp_path / "cut.csv"
    command = [sys.executable, "-m", "earlyexit_kernels", "classify", saved_classifier, source]
    subprocess.run([*command, str(whole), "--chunk-rows", "50"], check=True, capture_output=True)

    run = subprocess.Popen([*command, str(cut), "--chunk-rows", "50"], stderr=subprocess.DEVNULL)
    progress = Path(str(cut) + ".eek-progress.json")
    deadline = time.time() + 60
    while time.time() < deadline and run.poll() is None:
        if progress.exists() and json.loads(progress.read_text() or '{"rows": 0}')["rows"] >= 200:
            os.kill(run.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([*command, str(cut), "--chunk-rows", "50", "--resume"], check=True, capture_output=True)
    assert cut.read_bytes() == whole.read_bytes()


@pytest.mark.parametrize(
    "make_args, message",
    [
        (
            lambda m, s, t: ("classify", m, s, t, "--text-column", "body"),
            "no column 'body'.*columns are \\['id', 'text'\\]",
        ),
        (lambda m, s, t: ("classify", m, s, t, "--policy", "Entropy(tau=0.3)"), "--policy: Entropy"),
        (
            lambda m, s, t: ("classify", m, s, t, "--policy", "__import__('os')"),
            "--policy: the arguments|unknown policy",
        ),
        (lambda m, s, t: ("classify", m, s, str(t).replace(".csv", ".xlsx")), "unknown format .xlsx"),
        (lambda m, s, t: ("classify", m, s + ".missing.csv", t), "does not exist"),
        (lambda m, s, t: ("classify", Path(m).parent, s, t), "no config.json"),
        (lambda m, s, t: ("classify", m, s, t, "--resume"), "nothing to resume"),
    ],
)
def test_bad_input_gets_one_clear_line_and_status_2(saved_classifier, tmp_path, capsys, make_args, message):
    source = _write(pd.DataFrame({"id": [1, 2], "text": ["w1", "w2"]}), tmp_path / "in.csv")
    assert _run(*make_args(saved_classifier, source, tmp_path / "out.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


def test_an_unreadable_file_and_an_existing_output_are_refused(saved_classifier, tmp_path, capsys):
    garbage = tmp_path / "in.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    assert _run("classify", saved_classifier, garbage, tmp_path / "out.csv") == 2
    assert "cannot read" in capsys.readouterr().err
    source = _write(pd.DataFrame({"text": ["w1"]}), tmp_path / "in.csv")
    (tmp_path / "exists.csv").write_text("x\n")
    assert _run("classify", saved_classifier, source, tmp_path / "exists.csv") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "exists.csv").read_text() == "x\n"


def test_a_value_that_is_not_text_is_refused_with_its_row(saved_classifier, tmp_path, capsys):
    source = _write(pd.DataFrame({"text": [7, 42]}), tmp_path / "in.parquet")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 2
    assert "row 0: column 'text' holds int 7, not text" in capsys.readouterr().err
    mixed = tmp_path / "in.jsonl"
    mixed.write_text('{"text": "w1"}\n{"text": 42}\n')
    assert _run("classify", saved_classifier, mixed, tmp_path / "out2.csv") == 2
    assert "changed from string to number in row 1" in capsys.readouterr().err


def test_a_model_folder_that_is_not_a_supported_classifier(tmp_path, capsys):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    folder = tmp_path / "gpt2"
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(folder)
    source = _write(pd.DataFrame({"text": ["w1"]}), tmp_path / "in.csv")
    assert _run("classify", folder, source, tmp_path / "out.csv", "--policy", "Entropy(0.3)") == 2
    assert "not a supported classifier" in capsys.readouterr().err


def test_the_module_runs_as_a_program(saved_classifier, tmp_path):
    source = _write(pd.DataFrame({"text": word_texts(5)}), tmp_path / "in.csv")
    done = subprocess.run(
        [sys.executable, "-m", "earlyexit_kernels", "classify", saved_classifier, source, str(tmp_path / "o.csv")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "classified 5 rows" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "earlyexit_kernels", "classify"], capture_output=True, text=True)
    assert bad.returncode == 2 and "MODEL" in bad.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Entropy(0.3)", eek.Entropy(0.3)),
        ("Entropy(threshold=[0.1, 0.2], normalized=True)", eek.Entropy((0.1, 0.2), normalized=True)),
        ("Patience(2)", eek.Patience(2)),
        ("QExit(q=0.4, combine='subtract')", eek.QExit(0.4, combine="subtract")),
        ("DACT", eek.DACT()),
        (" Voting(3) ", eek.Voting(3)),
        ("SkipGates(entropy_threshold=0.2)", eek.SkipGates(entropy_threshold=0.2)),
    ],
)
def test_policies_are_parsed_from_text(text, expected):
    assert parse_policy(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("Entropy(", "cannot parse"),
        ("Softmax(0.3)", "unknown policy 'Softmax'; the policies are Entropy, MaxProb"),
        ("Entropy(x)", "must be literals"),
        ("Entropy(**{'threshold': 1})", "must be literals"),
        ("os.system('ls')", "must be a policy name"),
        ("Scheduled([1, 2])", "Scheduled"),
        ("Patience(patience=0)", "patience must be an integer >= 1"),
        ("Voting(K=2)", "unexpected keyword argument 'K'"),
    ],
)
def test_bad_policy_text_says_what_to_fix(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_policy(text)
