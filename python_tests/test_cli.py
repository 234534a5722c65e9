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
from conftest import word_bert, word_texts, write_table
from transformers import BertTokenizerFast

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.cli import main

pd = pytest.importorskip("pandas", reason="the command line writes JSON lines through pandas")
pytest.importorskip("pyarrow", reason="the command line reads and writes tables through pyarrow")

FORMATS = ("csv", "tsv", "jsonl", "parquet")
# The tiny model's ops are microseconds: more than one thread only waits for the others,
# badly so on a busy machine. Subprocesses get the same through OMP_NUM_THREADS.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


# one torch thread for the module's tests, given back after (conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _read(path: Path):
    kind = path.suffix[1:]
    if kind in ("csv", "tsv"):
        return pd.read_csv(path, sep="\t" if kind == "tsv" else ",", keep_default_na=False, dtype={"text": str})
    if kind == "jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


_EXPECTED_CACHE = {}


def _expected_of_saved(folder, texts):
    """``_expected`` of the saved model as saved, computed once per texts (several tests share them)."""
    key = (folder, tuple(texts))
    if key not in _EXPECTED_CACHE:
        _EXPECTED_CACHE[key] = _expected(eek.from_pretrained(folder), folder, texts)
    return _EXPECTED_CACHE[key]


def _expected(model, folder, texts, pairs=None):
    """(label, score, exit_layer, layers_run) of ``model`` on each text alone."""
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    rows = []
    for i, text in enumerate(texts):
        with torch.no_grad():
            out = model(**tokenizer(*((text, pairs[i]) if pairs else (text,)), return_tensors="pt"))
        probabilities = out.logits[0].softmax(-1)
        label = model.config.id2label[int(probabilities.argmax())]
        rows.append((label, float(probabilities.max()), int(out.exit_layer), int(out.layers_run)))
    return rows


def _run(*argv):
    return main([str(a) for a in argv])


@pytest.mark.parametrize("kind_in, kind_out", [(k, k) for k in FORMATS] + [("csv", "parquet"), ("parquet", "jsonl")])
def test_every_row_gets_the_model_s_own_answer(saved_classifier, tmp_path, kind_in, kind_out):
    texts = word_texts(100, seed=1)
    source = write_table(pd.DataFrame({"id": range(100), "text": texts}), tmp_path / f"in.{kind_in}")
    target = tmp_path / f"out.{kind_out}"
    assert _run("classify", saved_classifier, source, target, "--chunk-rows", 32, "--no-progress") == 0
    out = _read(target)
    assert list(out.columns) == ["id", "text", "label", "score", "exit_layer", "layers_run"]
    assert [int(i) for i in out.id] == list(range(100))
    assert [str(t) for t in out.text] == texts
    for (label, score, exit_layer, layers_run), row in zip(
        _expected_of_saved(saved_classifier, texts), out.itertuples()
    ):
        assert (row.label, row.exit_layer, row.layers_run) == (label, exit_layer, layers_run)
        assert row.score == pytest.approx(score, abs=1e-6)
    assert out.exit_layer.nunique() >= 2
    assert not Path(str(target) + ".eek-progress.json").exists()


def test_text_pairs(saved_classifier, tmp_path):
    first, second = word_texts(20, seed=4), word_texts(20, seed=5)
    source = write_table(pd.DataFrame({"q": first, "d": second}), tmp_path / "in.jsonl")
    _run("classify", saved_classifier, source, tmp_path / "out.jsonl", "--text-column", "q", "--pair-column", "d")
    out = _read(tmp_path / "out.jsonl")
    expected = _expected(eek.from_pretrained(saved_classifier), saved_classifier, first, second)
    assert [tuple(r) for r in out[["label", "exit_layer"]].itertuples(index=False)] == [
        (label, exit_layer) for label, _, exit_layer, _ in expected
    ]


def test_skip_gates_write_the_layers_they_ran(saved_classifier, tmp_path):
    # Untrained gates say 0.1: a skip threshold of 0.05 skips layers 2 and 3 of every sequence; the
    # saved model's threshold lets about half of them exit at layer 1, the others run layers 1 and 4.
    threshold = eek.policy_of(eek.from_pretrained(saved_classifier)).threshold
    policy = f"SkipGates(skip_threshold=0.05, entropy_threshold={threshold!r})"
    texts = word_texts(40, seed=8)
    source = write_table(pd.DataFrame({"text": texts}), tmp_path / "in.csv")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv", "--policy", policy) == 0
    out = _read(tmp_path / "out.csv")
    model = eek.from_pretrained(saved_classifier, eek.SkipGates(0.05, threshold))
    expected = _expected(model, saved_classifier, texts)
    assert [tuple(r) for r in out[["label", "exit_layer", "layers_run"]].itertuples(index=False)] == [
        (label, exit_layer, layers_run) for label, _, exit_layer, layers_run in expected
    ]
    assert (out.layers_run < out.exit_layer).any()


def test_policy_replaces_the_saved_one(saved_classifier, tmp_path):
    source = write_table(pd.DataFrame({"text": word_texts(30, seed=2)}), tmp_path / "in.csv")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv", "--policy", "Entropy(0.0)") == 0
    assert set(_read(tmp_path / "out.csv").exit_layer) == {4}  # an entropy is never below 0: no early exit


def test_a_plain_classifier_needs_a_policy(saved_classifier, tmp_path, capsys):
    plain = tmp_path / "plain"
    eek.unpatch(eek.from_pretrained(saved_classifier)).save_pretrained(plain)
    BertTokenizerFast.from_pretrained(saved_classifier).save_pretrained(plain)
    source = write_table(pd.DataFrame({"text": word_texts(10)}), tmp_path / "in.csv")
    assert _run("classify", plain, source, tmp_path / "a.csv") == 2
    assert "plain Hugging Face model: pass --policy" in capsys.readouterr().err
    assert _run("classify", plain, source, tmp_path / "b.csv", "--policy", "Patience(2)") == 0
    assert set(_read(tmp_path / "b.csv").exit_layer) <= {3, 4}  # Patience(2) leaves at layer 3 at the earliest


def test_a_regression_head_writes_its_value_as_score(tmp_path):

    folder = tmp_path / "regression"
    folder.mkdir()
    model, tokenizer = word_bert(folder, 1, hidden_size=16, num_hidden_layers=2, intermediate_size=32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts = word_texts(8, seed=3)
    source = write_table(pd.DataFrame({"text": texts}), tmp_path / "in.parquet")
    policy = "Patience(1, regression_threshold=0.1)"
    assert _run("classify", folder, source, tmp_path / "out.parquet", "--policy", policy) == 0
    out = _read(tmp_path / "out.parquet")
    tokenizer = BertTokenizerFast.from_pretrained(folder)
    eek.patch(model, eek.Patience(1, regression_threshold=0.1))
    with torch.no_grad():
        alone = [model(**tokenizer(t, return_tensors="pt")) for t in texts]
    assert out.label.isna().all()
    assert out.score.tolist() == pytest.approx([float(o.logits[0, 0]) for o in alone], abs=1e-5)
    assert out.exit_layer.tolist() == [int(o.exit_layer) for o in alone]


def test_empty_and_null_texts_are_classified_as_empty_and_named(saved_classifier, tmp_path, capsys):
    source = write_table(pd.DataFrame({"text": ["w1 w2", None, "", "w3", "  "]}), tmp_path / "in.jsonl")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 0
    out = _read(tmp_path / "out.csv")
    assert len(out) == 5 and out.text.tolist() == ["w1 w2", "", "", "w3", "  "]
    alone = _expected_of_saved(saved_classifier, [""])[0]
    assert (out.label[1], out.exit_layer[1]) == (out.label[2], out.exit_layer[2]) == (alone[0], alone[2])
    err = capsys.readouterr().err
    assert "warning: 3 rows have an empty or null 'text' and were classified as the empty text" in err
    assert "(rows 1, 2, 4;" in err


def test_long_texts_are_truncated_with_a_one_line_warning(saved_classifier, tmp_path, capsys):
    source = write_table(pd.DataFrame({"text": ["w1 w2", "w3 " * 20]}), tmp_path / "in.csv")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv", "--max-length", 8) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("warning")] == [
        "warning: input 1 (and maybe others) is longer than max_length=8 tokens and is truncated; raise "
        "max_length (up to what the model's positions hold) to keep more"
    ]


def test_an_input_without_rows_gives_an_output_with_its_columns(saved_classifier, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("id,text\n")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 0
    assert (tmp_path / "out.csv").read_text().splitlines() == ["id,text,label,score,exit_layer,layers_run"]


def _interrupt_after(monkeypatch, chunks):
    """Make the writer stop after ``chunks`` chunks with a KeyboardInterrupt (Ctrl-C)."""
    from earlyexit_kernels.integrations import table_io

    write = table_io.ChunkWriter.write
    calls = {"n": 0}

    def dying(self, table):
        if calls["n"] == chunks:
            raise KeyboardInterrupt
        calls["n"] += 1
        write(self, table)

    monkeypatch.setattr(table_io.ChunkWriter, "write", dying)


@pytest.mark.parametrize("kind", FORMATS)
def test_resume_after_an_interruption_loses_and_repeats_no_row(saved_classifier, tmp_path, monkeypatch, capsys, kind):
    texts = word_texts(150, seed=6)
    source = write_table(pd.DataFrame({"id": range(150), "text": texts}), tmp_path / f"in.{kind}")
    whole, cut = tmp_path / f"whole.{kind}", tmp_path / f"cut.{kind}"
    assert _run("classify", saved_classifier, source, whole, "--chunk-rows", 20) == 0

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert _run("classify", saved_classifier, source, cut, "--chunk-rows", 20) == 130
    assert "run again with --resume" in capsys.readouterr().err
    # Killed in the middle of writing the next chunk:
    if kind == "parquet":
        (tmp_path / f"cut.{kind}.eek-parts" / ".part-000003.parquet.tmp").write_bytes(b"PAR1 half a file")
    else:
        with open(cut, "ab") as file:
            file.write(b'"60","w1 w2\nw3","pos",0.5')
    assert _run("classify", saved_classifier, source, cut, "--chunk-rows", 32, "--resume") == 0
    assert "classified 90 rows (resumed after row 60)" in capsys.readouterr().err
    # Every row once, in order, ids, texts and labels exact; scores within float32 rounding (the
    # resumed run's layer calls hold other rows, and a product's last bits follow its shape).
    pd.testing.assert_frame_equal(_read(cut), _read(whole))


def test_resume_after_a_real_kill(saved_classifier, tmp_path):
    texts = word_texts(400, seed=7)
    source = write_table(pd.DataFrame({"id": range(400), "text": texts}), tmp_path / "in.jsonl")
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    assert _run("classify", saved_classifier, source, whole, "--chunk-rows", 20) == 0

    command = [sys.executable, "-m", "earlyexit_kernels", "classify", saved_classifier, source, str(cut)]
    run = subprocess.Popen([*command, "--chunk-rows", "20"], stderr=subprocess.DEVNULL, env=ONE_THREAD)
    progress = Path(str(cut) + ".eek-progress.json")
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["rows"] >= 60:
            os.kill(run.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 60 <= json.loads(progress.read_text())["rows"] < 400
    assert _run("classify", saved_classifier, source, cut, "--chunk-rows", 20, "--resume") == 0
    # The resumed stream batches its rows with other partners than the whole run did, and
    # eager layer calls run the exact rows: a score may differ in its last bits, nothing else.
    resumed, uninterrupted = _read(cut), _read(whole)
    assert list(resumed.id) == list(range(400))
    exact = ["id", "text", "label", "exit_layer", "layers_run"]
    pd.testing.assert_frame_equal(resumed[exact], uninterrupted[exact])
    assert resumed.score.to_numpy() == pytest.approx(uninterrupted.score.to_numpy(), abs=1e-6)


def test_the_module_runs_as_a_program(saved_classifier, tmp_path):
    source = write_table(pd.DataFrame({"text": word_texts(5)}), tmp_path / "in.csv")
    done = subprocess.run(
        [sys.executable, "-m", "earlyexit_kernels", "classify", saved_classifier, source, str(tmp_path / "o.csv")],
        capture_output=True,
        text=True,
        env=ONE_THREAD,
    )
    assert done.returncode == 0, done.stderr
    assert "classified 5 rows" in done.stderr and "Traceback" not in done.stderr
    assert len(_read(tmp_path / "o.csv")) == 5


def test_engine_options_reach_the_engine(saved_classifier, tmp_path, monkeypatch):
    classify_module = sys.modules["earlyexit_kernels.engine.entry.classify"]  # eek.classify is the function
    real, seen = classify_module.classify, {}

    def recording(model, inputs, **options):
        seen.update(options)
        return real(model, inputs, **{**options, "compile": False, "progress": False})

    monkeypatch.setattr(classify_module, "classify", recording)
    source = write_table(pd.DataFrame({"text": word_texts(5)}), tmp_path / "in.csv")
    argv = ["--max-batch-size", 8, "--max-tokens", 512, "--max-length", 32, "--compile", "--progress"]
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv", *argv) == 0
    assert {k: seen[k] for k in ("max_batch_size", "max_tokens", "max_length", "compile", "progress")} == {
        "max_batch_size": 8,
        "max_tokens": 512,
        "max_length": 32,
        "compile": True,
        "progress": True,
    }
    assert _run("classify", saved_classifier, source, tmp_path / "out2.csv", "--no-progress") == 0
    assert seen["progress"] is False and seen["compile"] is False and seen["max_tokens"] is None


def test_threads_sets_torch_s_threads_for_the_run(saved_classifier, tmp_path, monkeypatch):
    classify_module = sys.modules["earlyexit_kernels.engine.entry.classify"]
    real, seen = classify_module.classify, []

    def recording(model, inputs, **options):
        seen.append(torch.get_num_threads())
        return real(model, inputs, **options)

    monkeypatch.setattr(classify_module, "classify", recording)
    source = write_table(pd.DataFrame({"text": word_texts(5)}), tmp_path / "in.csv")
    try:
        assert _run("classify", saved_classifier, source, tmp_path / "out.csv", "--threads", 2) == 0
    finally:
        torch.set_num_threads(1)  # this module's setting (see _one_thread)
    assert seen == [2]


def test_usage_errors_exit_with_status_2(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["classify"])
    assert stopped.value.code == 2 and "MODEL, INPUT, OUTPUT" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        main(["classify", "m", "i.csv", "o.csv", "--max-batch-size", "many"])
    assert stopped.value.code == 2 and "invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make_args, message",
    [
        (
            lambda m, s, t: ("classify", m, s, t, "--text-column", "body"),
            r"has no column 'body' \(--text-column\); its columns are \['id', 'text'\]",
        ),
        (lambda m, s, t: ("classify", m, s, t, "--pair-column", "second"), r"no column 'second' \(--pair-column\)"),
        (lambda m, s, t: ("classify", m, s, t, "--policy", "Entropy(tau=0.3)"), "--policy: .*'tau'.*Entropy\\(thr"),
        (lambda m, s, t: ("classify", m, s, t, "--policy", "Softmax(0.3)"), "unknown policy 'Softmax'; the poli"),
        (
            lambda m, s, t: ("classify", m, s, t, "--policy", "__import__('os')"),
            "--policy: unknown policy '__import__'",
        ),
        (lambda m, s, t: ("classify", m, s, t, "--policy", "Scheduled([1])"), "--policy: Scheduled"),
        (lambda m, s, t: ("classify", m, s, str(t).replace(".csv", ".xlsx")), "unknown format .xlsx"),
        (lambda m, s, t: ("classify", m, s + ".missing.csv", t), "does not exist"),
        (lambda m, s, t: ("classify", Path(m).parent, s, t), "has no config.json"),
        (lambda m, s, t: ("classify", Path(m) / "config.json", s, t), "is not a folder"),
        (lambda m, s, t: ("classify", m, s, t, "--max-batch-size", 0), "--max-batch-size: max_batch_size must be"),
        (lambda m, s, t: ("classify", m, s, t, "--max-tokens", 0), "max_tokens must be an integer >= 1"),
        (lambda m, s, t: ("classify", m, s, t, "--max-length", 65), r"max_length must be an integer in 1\.\.64"),
        (lambda m, s, t: ("classify", m, s, t, "--backend", "gpu"), "backend must be one of 'auto'"),
        (lambda m, s, t: ("classify", m, s, t, "--threads", 0), "--threads must be >= 1, got 0"),
        (lambda m, s, t: ("classify", m, s, t, "--threads", 2, "--engine", "ray"), "--threads .* --engine local"),
        (lambda m, s, t: ("classify", m, s, s + "/out.csv"), r"cannot write .*in\.csv/out\.csv: \[Errno"),
    ],
)
def test_bad_input_gets_one_clear_line_and_status_2(saved_classifier, tmp_path, capsys, make_args, message):
    source = write_table(pd.DataFrame({"id": [1, 2], "text": ["w1", "w2"]}), tmp_path / "in.csv")
    assert _run(*make_args(saved_classifier, source, tmp_path / "out.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out.csv").exists()


def test_an_unreadable_file_and_an_existing_output_are_refused(saved_classifier, tmp_path, capsys):
    garbage = tmp_path / "in.parquet"
    garbage.write_bytes(b"not a parquet file at all")
    assert _run("classify", saved_classifier, garbage, tmp_path / "out.csv") == 2
    assert "cannot read" in capsys.readouterr().err
    source = write_table(pd.DataFrame({"text": ["w1"]}), tmp_path / "in.csv")
    (tmp_path / "exists.csv").write_text("x\n")
    assert _run("classify", saved_classifier, source, tmp_path / "exists.csv") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "exists.csv").read_text() == "x\n"
    assert _run("classify", saved_classifier, source, tmp_path / "exists.csv", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _run("classify", saved_classifier, source, tmp_path / "exists.csv", "--overwrite") == 0
    assert len(_read(tmp_path / "exists.csv")) == 1


def test_resume_with_another_input_is_refused(saved_classifier, tmp_path, monkeypatch, capsys):
    first = write_table(pd.DataFrame({"text": word_texts(80)}), tmp_path / "a.csv")
    second = write_table(pd.DataFrame({"text": word_texts(80)}), tmp_path / "b.csv")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        assert _run("classify", saved_classifier, first, tmp_path / "out.csv", "--chunk-rows", 20) == 130
    assert _run("classify", saved_classifier, second, tmp_path / "out.csv", "--resume") == 2
    assert re.search(r"error: cannot resume .*a\.csv'?, not input=.*b\.csv", capsys.readouterr().err)


def test_a_resume_of_a_run_killed_before_writing_starts_from_the_first_row(saved_classifier, tmp_path):
    source = write_table(pd.DataFrame({"text": word_texts(5)}), tmp_path / "in.csv")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv", "--resume") == 0
    assert len(_read(tmp_path / "out.csv")) == 5


def test_columns_the_output_format_cannot_hold(saved_classifier, tmp_path, capsys):
    source = write_table(pd.DataFrame({"tags": [["a", "b"], []], "text": ["w1", "w2"]}), tmp_path / "in.parquet")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 2
    assert "cannot write the columns (tags: list<element: string>" in capsys.readouterr().err
    assert not (tmp_path / "out.csv").exists()
    assert _run("classify", saved_classifier, source, tmp_path / "out.jsonl") == 0
    assert _read(tmp_path / "out.jsonl").tags.tolist() == [["a", "b"], []]


def test_a_value_that_is_not_text_is_refused_with_its_row(saved_classifier, tmp_path, capsys):
    source = write_table(pd.DataFrame({"text": [7, 42]}), tmp_path / "in.parquet")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 2
    assert "row 0: column 'text' holds int 7, not text" in capsys.readouterr().err
    mixed = tmp_path / "in.jsonl"
    mixed.write_text('{"text": "w1"}\n{"text": 42}\n')
    assert _run("classify", saved_classifier, mixed, tmp_path / "out2.csv") == 2
    assert "changed from string to number in row 1" in capsys.readouterr().err


def test_an_input_that_already_has_an_output_column_is_refused(saved_classifier, tmp_path, capsys):
    source = write_table(pd.DataFrame({"text": ["w1"], "label": ["pos"]}), tmp_path / "in.csv")
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 2
    assert "already has the column(s) ['label'] that the output adds; rename them" in capsys.readouterr().err
    # the audit's column is the output's only with an audit
    audited = write_table(pd.DataFrame({"text": ["w1"], "audit_disagreement": [0.0]}), tmp_path / "audited.csv")
    assert _run("classify", saved_classifier, audited, tmp_path / "out3.csv", "--audit-fraction", "0.5") == 2
    assert "already has the column(s) ['audit_disagreement']" in capsys.readouterr().err
    assert _run("classify", saved_classifier, audited, tmp_path / "out4.csv") == 0


def test_model_folders_that_are_not_supported_classifiers(saved_classifier, tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2ForSequenceClassification

    source = write_table(pd.DataFrame({"text": ["w1"]}), tmp_path / "in.csv")
    gpt2 = tmp_path / "gpt2"
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    assert _run("classify", gpt2, source, tmp_path / "out.csv", "--policy", "Entropy(0.3)") == 2
    assert "not a supported classifier" in capsys.readouterr().err

    masked = tmp_path / "masked"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(masked)
    assert _run("classify", masked, source, tmp_path / "out.csv", "--policy", "Entropy(0.3)") == 2
    assert "holds a BertForMaskedLM, not a sequence classifier" in capsys.readouterr().err

    no_tokenizer = tmp_path / "no_tokenizer"
    eek.from_pretrained(saved_classifier).save_pretrained(no_tokenizer)
    assert _run("classify", no_tokenizer, source, tmp_path / "out.csv") == 2
    assert "has no tokenizer (none of tokenizer.json" in capsys.readouterr().err


def test_without_pyarrow_the_command_line_says_what_to_install(saved_classifier, tmp_path, monkeypatch, capsys):
    source = write_table(pd.DataFrame({"text": ["w1"]}), tmp_path / "in.csv")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert _run("classify", saved_classifier, source, tmp_path / "out.csv") == 2
    assert "needs pyarrow (the cli extra): pip install pyarrow pandas" in capsys.readouterr().err
