"""``--device`` and ``--dtype`` on every command that loads a model: the base it runs on.

int8 runs the encoder's Linear layers quantized with the family's recipe, the exit heads fused on
it; ``eek calibrate --dtype int8`` certifies the threshold on that base and says so in the folder.
"""

import json
import warnings

import pytest
import torch
from conftest import write_table as _write
from test_fit_cli import FAST, _frame, _run, classifier  # noqa: F401 - classifier is a fixture

from earlyexit_kernels.engine.layers import precision
from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.integrations import cli_options
from earlyexit_kernels.integrations.cli import build_parser

pd = pytest.importorskip("pandas", reason="the data files are written with pandas")
COMMANDS = ("classify", "serve", "evaluate", "fit", "calibrate")


def test_the_command_line_names_are_the_engine_s():
    assert cli_options.DEVICES == precision.DEVICES and cli_options.DTYPES == precision.DTYPES
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "fit" in a.choices)
    for name in COMMANDS:
        options = {o: a for a in commands.choices[name]._actions for o in a.option_strings}
        assert options["--device"].default == "auto" and options["--device"].choices == precision.DEVICES, name
        assert options["--dtype"].default is None and tuple(options["--dtype"].choices) == precision.DTYPES, name


@pytest.fixture(scope="module")
def fitted(classifier, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("base") / "model"
    assert _run("fit", classifier, _write(_frame(200, seed=41), folder.parent / "train.csv"), folder, *FAST) == 0
    return folder


def test_classify_and_evaluate_run_on_an_int8_base(fitted, tmp_path, capsys):
    rows = _frame(80, seed=42)
    data = _write(rows.drop(columns="label"), tmp_path / "in.csv")
    assert _run("classify", fitted, data, tmp_path / "float.csv", "--no-progress", "--device", "cpu") == 0
    assert _run("classify", fitted, data, tmp_path / "int8.csv", "--no-progress", "--dtype", "int8") == 0
    as_float, as_int8 = pd.read_csv(tmp_path / "float.csv"), pd.read_csv(tmp_path / "int8.csv")
    assert len(as_int8) == 80 and set(as_int8.columns) >= {"label", "score", "exit_layer", "layers_run"}
    # a tiny random model's answers near its decision boundary may move; most stay
    assert (as_float.label == as_int8.label).mean() > 0.8
    capsys.readouterr()
    labelled = _write(rows, tmp_path / "labelled.csv")
    assert _run("evaluate", fitted, labelled, "--dtype", "int8", "--no-progress") == 0
    assert "accuracy:" in capsys.readouterr().out


def test_calibrate_certifies_on_the_base_it_is_given_and_records_it(fitted, tmp_path, capsys):
    rows = _write(_frame(400, seed=43), tmp_path / "rows.csv")
    weights = (fitted / "model.safetensors").read_bytes()
    assert _run("calibrate", fitted, rows, "--dtype", "int8", "--max-drop", "5", "--no-progress") == 0
    summary = json.loads((fitted / "eek_fit.json").read_text())
    assert summary["base"] == "int8" and summary["recalibrations"][-1]["base"] == "int8"
    assert summary["int8_isa"] == int8_isa()  # the class of CPU the int8 certificate holds for
    assert (fitted / "model.safetensors").read_bytes() == weights  # the saved weights stay float, untouched
    # the int8 recipe the certificate holds for is recorded beside it, and what --dtype int8 loads
    from earlyexit_kernels.integrations.model_folder import load_model

    recorded = json.loads((fitted / "eek_fit.json").read_text())["int8_recipe"]
    assert recorded == precision.int8_recipe(load_model(str(fitted))[0])  # the family's, where it can run
    assert f"int8 recipe: {recorded} (recorded in eek_fit.json)" in capsys.readouterr().out
    assert load_model(str(fitted), dtype="int8")[0].eek_int8_recipe == recorded
    # a folder whose record names another recipe runs that one: the one its certificate holds for
    (fitted / "eek_fit.json").write_text(json.dumps({**summary, "int8_recipe": "ffn-out-float"}))
    assert load_model(str(fitted), dtype="int8")[0].eek_int8_recipe == "ffn-out-float"
    # certified on int8 before recipes were recorded: the recipe every int8 base ran then
    (fitted / "eek_fit.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "int8_recipe"}))
    assert load_model(str(fitted), dtype="int8")[0].eek_int8_recipe == "all"
    # re-certified on float32: no int8 class recorded any more
    assert _run("calibrate", fitted, rows, "--dtype", "float32", "--max-drop", "5", "--no-progress") == 0
    assert "int8_isa" not in json.loads((fitted / "eek_fit.json").read_text())
    # the float32 base's folder (no int8 certificate) runs the family's
    summary["base"] = "float32"
    (fitted / "eek_fit.json").write_text(json.dumps(summary))
    assert load_model(str(fitted), dtype="int8")[0].eek_int8_recipe == recorded


def test_a_folder_certified_on_a_runtime_missing_here_runs_on_the_next_saying_so(fitted, tmp_path, monkeypatch):
    """Where the runtime a folder's int8 certificate was made on is not installed, the folder still loads (a server
    still starts) on the next runtime's recipe, OpenVINO -> ONNX Runtime -> PyTorch's kernels, with a warning that
    names the missing runtime, what installs it, and that the certificate does not cover what runs instead."""
    import shutil

    from earlyexit_kernels.engine.layers import ov_layer
    from earlyexit_kernels.engine.layers.ort_layer import ort_available
    from earlyexit_kernels.integrations.model_folder import load_model

    folder = tmp_path / "model"
    shutil.copytree(fitted, folder)
    summary = json.loads((folder / "eek_fit.json").read_text())
    (folder / "eek_fit.json").write_text(json.dumps({**summary, "int8_recipe": "per-token-ov"}))
    monkeypatch.setattr(ov_layer, "ov_available", lambda: False)
    next_one = "per-token-ort" if ort_available() else "per-token"
    with pytest.warns(UserWarning) as caught:
        model = load_model(str(folder), dtype="int8")[0]
    assert model.eek_int8_recipe == next_one
    said = [str(w.message) for w in caught if "whose runtime is missing here" in str(w.message)]
    assert len(said) == 1 and "made on the per-token-ov recipe" in said[0] and f"runs on {next_one} instead" in said[0]
    assert "openvino and onnx are not installed" in said[0] and "'.[openvino]'" in said[0]
    assert "does not cover" in said[0] and "eek calibrate COPY ROWS --dtype int8" in said[0]
    monkeypatch.setattr(precision, "ort_available", lambda: False)  # neither runtime: PyTorch's kernels
    with pytest.warns(UserWarning, match=r"per-token-ov recipe, whose runtime is missing .* runs on per-token instead"):
        assert load_model(str(folder), dtype="int8")[0].eek_int8_recipe == "per-token"
    # a folder whose runtime is here runs what was certified, without that warning
    (folder / "eek_fit.json").write_text(json.dumps({**summary, "int8_recipe": "per-token"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_model(str(folder), dtype="int8")[0].eek_int8_recipe == "per-token"
    assert not [w for w in caught if "whose runtime is missing here" in str(w.message)]


@pytest.mark.parametrize(
    # the static layers are set on the fit's rows and saved with the folder: test_ov_static's
    "layers, recipe",
    [
        (layers, recipe)
        for layers, recipe in precision.INT8_LAYERS.items()
        if recipe not in precision.CALIBRATED_RECIPES
    ],
)
def test_calibrate_certifies_int8_on_the_layers_asked_for_and_serving_runs_them(
    fitted, tmp_path, capsys, layers, recipe
):
    import shutil

    from earlyexit_kernels.engine.layers.ort_layer import ort_available
    from earlyexit_kernels.engine.layers.ov_layer import ov_available
    from earlyexit_kernels.integrations.model_folder import load_model

    if (layers == "openvino" and not ov_available()) or (layers == "onnxruntime" and not ort_available()):
        pytest.skip(f"{layers} is not installed")
    folder = tmp_path / "model"
    shutil.copytree(fitted, folder)
    rows = _write(_frame(400, seed=43), tmp_path / "rows.csv")
    argv = ("calibrate", folder, rows, "--dtype", "int8", "--layers", layers, "--max-drop", "5", "--no-progress")
    assert _run(*argv) == 0
    assert f"int8 recipe: {recipe} (recorded in eek_fit.json)" in capsys.readouterr().out
    assert json.loads((folder / "eek_fit.json").read_text())["int8_recipe"] == recipe
    assert load_model(str(folder), dtype="int8")[0].eek_int8_recipe == recipe


def test_layers_without_int8_or_with_an_audit_record_is_one_clear_line(fitted, tmp_path, capsys):
    rows = _write(_frame(50, seed=46), tmp_path / "rows.csv")
    assert _run("calibrate", fitted, rows, "--layers", "torch", "--no-progress") == 2
    assert "--layers torch says where the int8 layers run: give --dtype int8 with it" in capsys.readouterr().err
    assert _run("calibrate", fitted, "--from-audit", tmp_path / "audit.pt", "--layers", "openvino") == 2
    assert "--layers chooses the int8 layers; an audit record is certified as it was served" in capsys.readouterr().err


def test_the_int8_layers_named_on_the_command_line_are_the_engine_s():
    assert set(cli_options.INT8_LAYERS) == {"auto", *precision.INT8_LAYERS}


def test_the_traffic_named_on_the_command_line_is_the_runtime_choice_s():
    from earlyexit_kernels.engine.layers import runtime_choice

    assert tuple(cli_options.INT8_TRAFFIC) == runtime_choice.TRAFFIC


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where there is no CUDA device")
@pytest.mark.parametrize("command", ["classify", "evaluate"])
def test_cuda_without_a_gpu_is_one_clear_line(fitted, tmp_path, capsys, command):
    frame = _frame(10, seed=44)
    data = _write(frame.drop(columns="label") if command == "classify" else frame, tmp_path / "in.csv")
    argv = [command, fitted, data] + ([tmp_path / "out.csv"] if command == "classify" else [])
    assert _run(*argv, "--device", "cuda") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: torch ") and "use --device cpu or auto" in err


def test_model_may_be_a_hub_id_in_the_hub_s_local_cache(fitted, tmp_path):
    """As pipeline, TEI and Infinity users name a model: ``org/name``, found in HF_HOME's cache, offline."""
    import os
    import shutil
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--eek-model"
    shutil.copytree(fitted, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    data = _write(_frame(20, seed=45).drop(columns="label"), tmp_path / "in.csv")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "earlyexit_kernels", "classify"]
    done = subprocess.run(
        [*command, "org/eek-model", data, tmp_path / "out.csv", "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(tmp_path / "out.csv")) == 20
    missing = subprocess.run(
        [*command, "org/absent", data, tmp_path / "out2.csv"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert "MODEL org/absent is neither a folder nor a Hub id in the Hugging Face cache" in missing.stderr
    assert "HF_HUB_OFFLINE is set" in missing.stderr
