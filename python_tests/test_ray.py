"""Early exit on Ray Data: same answers as the local engine, rows that fail, an actor that dies.

The callable class is tested without Ray (it only needs pandas); the rest runs a real
local Ray (``ray.init(num_cpus=2)``). ``make test`` runs the equality test; the slower
ones carry the ``ray`` mark and run with ``make test-ray``.
"""

import os
import signal
import threading
import time

import pytest
import torch
from conftest import word_texts
from transformers import BertTokenizerFast

import earlyexit_kernels as eek

pd = pytest.importorskip("pandas", reason="the Ray integration works on pandas batches")
pa = pytest.importorskip("pyarrow", reason="the Ray integration reads and writes files through pyarrow")

from earlyexit_kernels.ray import ClassifierSettings, EarlyExitClassifier  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(saved_classifier):
    return saved_classifier


def test_the_class_adds_the_columns_each_equal_to_the_model_alone(model_dir):
    frame = pd.DataFrame({"id": range(40), "text": word_texts(300, seed=1)[:40]})
    out = EarlyExitClassifier(model_dir)(frame)
    assert list(out.columns) == ["id", "text", "label", "score", "exit_layer", "layers_run", "error"]
    model = eek.from_pretrained(model_dir)
    tokenizer = BertTokenizerFast.from_pretrained(model_dir)
    for text, row in zip(frame.text, out.itertuples()):
        with torch.no_grad():
            alone = model(**tokenizer(text, return_tensors="pt"))
        probabilities = alone.logits[0].softmax(-1)
        assert row.label == model.config.id2label[int(probabilities.argmax())]
        assert row.score == pytest.approx(float(probabilities.max()), abs=1e-6)
        assert row.exit_layer == int(alone.exit_layer) and row.layers_run == int(alone.layers_run)
        assert pd.isna(row.error)
    assert out.exit_layer.nunique() >= 2


def test_int8_runs_the_recipe_the_folders_int8_certificate_recorded(model_dir, tmp_path):
    import shutil

    from earlyexit_kernels.engine.layers.precision import int8_recipe
    from earlyexit_kernels.patching.fit_record import FitRecord

    frame = pd.DataFrame({"text": word_texts(300, seed=2)[:20]})
    family = EarlyExitClassifier(model_dir, dtype="int8")
    assert family.model.eek_int8_recipe == int8_recipe(eek.from_pretrained(model_dir))  # no certificate: the family's
    folder = shutil.copytree(model_dir, tmp_path / "certified")
    FitRecord(report={"policy": "Entropy(0.0)"}, base="int8", int8_recipe="per-token").save(folder)
    recorded = EarlyExitClassifier(str(folder), dtype="int8")
    assert recorded.model.eek_int8_recipe == "per-token"
    as_float, as_int8 = EarlyExitClassifier(model_dir)(frame), recorded(frame)
    assert (as_float.label == as_int8.label).mean() > 0.8


def test_the_classifier_takes_one_settings_object_its_fields_the_keywords_ray_passes(model_dir):
    frame = pd.DataFrame({"text": ["w1 w2", "w1 " * 20]})
    given = EarlyExitClassifier(model_dir, ClassifierSettings(max_length=8, truncation=False))
    spread = EarlyExitClassifier(model_dir, max_length=8, truncation=False)  # fn_constructor_kwargs' form
    assert given.options == spread.options and given(frame).equals(spread(frame))
    with pytest.raises(TypeError, match="takes its settings once"):
        EarlyExitClassifier(model_dir, ClassifierSettings(), max_length=8)
    with pytest.raises(TypeError, match="unexpected keyword\\(s\\) max_len"):
        EarlyExitClassifier(model_dir, max_len=8)
    with pytest.raises(ValueError, match="recertify=True reads the audit: give audit_fraction too"):
        ClassifierSettings(recertify=True)  # refused when made, before a model is loaded


def test_null_text_is_classified_as_empty_and_a_bad_row_gets_an_error(model_dir):
    classifier = EarlyExitClassifier(model_dir, max_length=8, truncation=False)
    frame = pd.DataFrame({"text": ["w1 w2", None, 3.5, "w1 " * 20, ""]})
    out = classifier(frame)
    assert out.error.isna().tolist() == [True, True, False, False, True]
    assert "not text (float)" in out.error[2]
    assert "over max_length=8" in out.error[3]
    assert out.label.isna().tolist() == [False, False, True, True, False]
    assert out.exit_layer[1] == out.exit_layer[4]  # null and "" are the same input


def test_batches_keep_their_form(model_dir):
    classifier = EarlyExitClassifier(model_dir)
    table = pa.table({"text": word_texts(5)})
    assert isinstance(classifier(table), pa.Table)
    as_numpy = classifier({"text": table.column("text").to_numpy(zero_copy_only=False)})
    assert isinstance(as_numpy, dict) and len(as_numpy["exit_layer"]) == 5


def test_a_missing_column_names_the_columns_there_are(model_dir):
    with pytest.raises(KeyError, match=r"no column 'text'.*\['body'\]"):
        EarlyExitClassifier(model_dir)(pd.DataFrame({"body": ["w1"]}))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is optional (the ray extra)")
    pytest.importorskip("ray.data", reason="Ray Data is optional: pip install 'ray[data]'")
    # Workers import this file's classes (the killed-actor test's) from here.
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": here}})
    yield ray
    ray.shutdown()


def test_ray_with_two_actors_gives_the_local_answers_for_every_row(model_dir, tmp_path, local_ray):
    from earlyexit_kernels.ray import classify_files

    frame = pd.DataFrame({"id": range(300), "text": word_texts(300, seed=1)})
    frame.to_csv(tmp_path / "input.csv", index=False)
    summary = classify_files(model_dir, str(tmp_path / "input.csv"), str(tmp_path / "out"), workers=2, batch_size=64)
    assert summary == {"rows": 300, "errors": 0, "output": str(tmp_path / "out")}

    written = pd.read_parquet(tmp_path / "out")
    assert written.id.tolist() == list(range(300))  # every row once, in input order
    local = EarlyExitClassifier(model_dir)(frame)
    assert written.label.tolist() == local.label.tolist()
    assert written.exit_layer.tolist() == local.exit_layer.tolist()
    assert written.layers_run.tolist() == local.layers_run.tolist()
    assert (written.score.astype(float) - local.score.astype(float)).abs().max() < 1e-6


class _PidReporting(EarlyExitClassifier):
    """Writes its actor's process id where the test can find it, then works as usual."""

    def __init__(self, *args, pid_dir, **kwargs):
        super().__init__(*args, **kwargs)
        (pid_dir / f"{os.getpid()}").touch()

    def __call__(self, batch):
        time.sleep(0.2)  # long enough for the test to kill an actor mid-run
        return super().__call__(batch)


@pytest.mark.ray
def test_an_actor_killed_mid_run_is_restarted_and_no_row_is_lost_or_repeated(model_dir, tmp_path, local_ray):
    import ray.data

    frame = pd.DataFrame({"id": range(2000), "text": word_texts(2000, seed=2, longest=10)})
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    dataset = ray.data.from_pandas(frame).map_batches(
        _PidReporting,
        fn_constructor_kwargs={"model": model_dir, "pid_dir": pid_dir},
        concurrency=2,
        num_cpus=0.5,
        batch_size=50,
        batch_format="pandas",
        max_restarts=-1,
        max_task_retries=-1,
    )
    killed = []

    def kill_one():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pids = [int(p.name) for p in pid_dir.iterdir()]
            if len(pids) == 2:
                time.sleep(1.0)  # both actors are busy with batches by now
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one)
    killer.start()
    out = dataset.to_pandas()
    killer.join()
    assert killed, "no actor was killed: the test did not test anything"
    assert len(list(pid_dir.iterdir())) >= 3  # the killed actor came back
    assert sorted(out.id.tolist()) == list(range(2000))


@pytest.mark.ray
def test_rows_that_fail_do_not_abort_the_job_and_are_counted(model_dir, tmp_path, local_ray):
    from earlyexit_kernels.ray import classify_files

    texts = word_texts(100, seed=3, longest=5)
    texts[7] = "w1 " * 40
    pd.DataFrame({"text": texts}).to_json(tmp_path / "input.jsonl", orient="records", lines=True)
    summary = classify_files(
        model_dir, str(tmp_path / "input.jsonl"), str(tmp_path / "out"), workers=2, max_length=16, truncation=False
    )
    assert summary["rows"] == 100 and summary["errors"] == 1
    written = pd.read_parquet(tmp_path / "out")
    assert "over max_length=16" in written.error[7]


@pytest.mark.ray
def test_the_command_line_runs_on_ray(model_dir, tmp_path, local_ray, capsys):
    from earlyexit_kernels.integrations.cli import main

    pd.DataFrame({"text": word_texts(50, seed=4)}).to_parquet(tmp_path / "in.parquet")
    status = main(["classify", model_dir, str(tmp_path / "in.parquet"), str(tmp_path / "out"), "--engine", "ray"])
    assert status == 0
    assert "classified 50 rows on Ray (2 workers)" in capsys.readouterr().err
    written = pd.read_parquet(tmp_path / "out")
    local = EarlyExitClassifier(model_dir)(pd.DataFrame({"text": word_texts(50, seed=4)}))
    assert written.exit_layer.tolist() == local.exit_layer.tolist()
