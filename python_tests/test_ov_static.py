"""Static int8 encoder layers on OpenVINO (``ov_static``: each layer's graph quantized by NNCF on calibration rows).

The reference beside them is the float32 layer: a static layer moves from it by what int8 moves (of the order of
the per-token layer's move, never a wrong graph's), each token's output does not depend on the other rows of its
call (the scales are set before the call), and a folder's saved layers run bit for bit as the fit's.
"""

import copy
import json

import pytest
import torch
from conftest import tiny_model, tiny_mpnet
from test_fit_cli import classifier  # noqa: F401 - a fixture

from earlyexit_kernels.engine.layers import ov_static
from earlyexit_kernels.engine.layers.ort_layer import ORT_MISSING, OrtLayer, ort_available
from earlyexit_kernels.engine.layers.precision import int8_encoder

pytestmark = pytest.mark.skipif(not ov_static.static_available(), reason=ov_static.STATIC_MISSING)


def _batches(model, count=4, rows=8, length=12, seed=0):
    """Random calibration batches of the model's vocabulary, rows of unequal length."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(5, model.config.vocab_size, (rows, length), generator=generator)
        lengths = torch.randint(3, length + 1, (rows,), generator=generator)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


MODELS = {"bert": lambda: tiny_model("bert", num_layers=2), "mpnet": tiny_mpnet}


@pytest.fixture(scope="module", params=list(MODELS))
def static_pair(request):
    """(float32 model, its static int8 copy), calibrated on random rows of its vocabulary."""
    model = MODELS[request.param]()
    return model, int8_encoder(model, "static-ov", calibration=_batches(model))


def _norm(x):
    return float(x.norm())


def test_every_encoder_layer_is_a_static_openvino_layer_and_the_rest_stays_float(static_pair):
    model, static = static_pair
    layers = static.base_model.encoder.layer
    assert all(isinstance(layer, ov_static.StaticOvLayer) and layer.weight_bits in (7, 8) for layer in layers)
    assert static.eek_int8_recipe == "static-ov"
    assert "static int8 (NNCF)" in repr(layers[0])
    torch.testing.assert_close(static.classifier.state_dict(), model.classifier.state_dict(), rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the float32 model is left as it was


def _layer_out(layer, feeds: dict) -> torch.Tensor:
    """``layer``'s output on one call's recorded graph inputs, called as its encoder calls it; padding zeroed."""
    hidden, mask = torch.from_numpy(feeds["hidden"]), torch.from_numpy(feeds["key_mask"]).bool()
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    bias = (torch.from_numpy(feeds["position_bias"]),) if "position_bias" in feeds else ()
    with torch.no_grad():
        out = layer(hidden, additive, *bias)
    return (out[0] if isinstance(out, tuple) else out) * mask[..., None]


@pytest.mark.int8_kernels
def test_a_static_layer_moves_from_the_float_layer_as_int8_does(static_pair):
    """On hidden states the model makes from rows the scales were not set on: measured on these tiny layers, the
    static layer's distance from the float layer is 2.2-3.6x the per-token layer's (one scale per tensor against
    one per token). A layer left float would sit near 0x, a wrong scale or graph at the output's own norm."""
    model, static = static_pair
    per_token = int8_encoder(model, "per-token")
    held_out = ov_static.calibration_feeds(model, _batches(model, count=2, rows=16, seed=7))
    for index, layer in enumerate(model.base_model.encoder.layer):
        for feeds in held_out[index]:
            exact = _layer_out(layer, feeds)
            moved = _norm(_layer_out(static.base_model.encoder.layer[index], feeds) - exact)
            per_token_moved = _norm(_layer_out(per_token.base_model.encoder.layer[index], feeds) - exact)
            assert 1.0 < moved / per_token_moved < 10, (moved, per_token_moved)


def test_each_token_s_output_does_not_depend_on_the_rows_beside_it(static_pair):
    model, static = static_pair
    layer = static.base_model.encoder.layer[0]
    feeds = ov_static.calibration_feeds(model, _batches(model, count=1, rows=6, seed=3))[0][0]
    batched = _layer_out(layer, feeds)
    for row in range(len(feeds["hidden"])):
        length = int(feeds["key_mask"][row].sum())
        alone = {
            name: value[row : row + 1, ..., :length, :] if name == "hidden" else value for name, value in feeds.items()
        }
        alone["key_mask"] = feeds["key_mask"][row : row + 1, :length]
        if "position_bias" in feeds:
            alone["position_bias"] = feeds["position_bias"][:1, :, :length, :length]
        torch.testing.assert_close(_layer_out(layer, alone)[0], batched[row, :length], rtol=1e-4, atol=1e-4)


def test_the_whole_model_keeps_the_float_model_s_logits_to_int8_s_rounding(static_pair):
    """Measured: 1e-4 at most on these tiny models' logits, on rows the scales were not set on."""
    model, static = static_pair
    with torch.no_grad():
        for batch in _batches(model, count=2, rows=16, seed=7):
            torch.testing.assert_close(static(**batch).logits, model(**batch).logits, rtol=0, atol=1e-3)


def test_saved_layers_load_and_run_bit_for_bit(static_pair, tmp_path):
    model, static = static_pair
    ov_static.save_static_layers(static, tmp_path)
    record = json.loads((tmp_path / ov_static.FOLDER / "layers.json").read_text())
    assert record["layers"] == model.config.num_hidden_layers and record["calibration_rows"] == 32
    loaded = ov_static.load_static_layers(_copy(model), tmp_path)
    batch = _batches(model, count=1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, static(**batch).logits, rtol=0, atol=0)


def _copy(model):
    return copy.deepcopy(model)


def test_the_exit_graph_s_settings_are_saved_with_the_layers_and_an_older_folder_loads_none(static_pair, tmp_path):
    model, static = static_pair
    chosen = _copy(static)
    for layer in chosen.base_model.encoder.layer:
        layer.exit_graph_settings = (("SNIPPETS_MODE", "DISABLE"),)
    ov_static.save_static_layers(chosen, tmp_path)
    path = tmp_path / ov_static.FOLDER / "layers.json"
    record = json.loads(path.read_text())
    assert record["exit_graph_settings"] == {"SNIPPETS_MODE": "DISABLE"} and record["exit_graph"] is True
    loaded = ov_static.load_static_layers(_copy(model), tmp_path)
    assert all(
        layer.exit_graph_settings == (("SNIPPETS_MODE", "DISABLE"),) and layer.exit_graph_on
        for layer in loaded.base_model.encoder.layer
    )
    assert _copy(loaded.base_model.encoder.layer[0]).exit_graph_settings == (("SNIPPETS_MODE", "DISABLE"),)
    path.write_text(json.dumps({k: v for k, v in record.items() if k not in ("exit_graph_settings", "exit_graph")}))
    older = ov_static.load_static_layers(_copy(model), tmp_path)
    assert all(layer.exit_graph_settings == () and layer.exit_graph_on for layer in older.base_model.encoder.layer)
    path.write_text(json.dumps({**record, "exit_graph_settings": ["SNIPPETS_MODE"]}))
    with pytest.raises(ValueError, match="exit_graph_settings is .* not options and their text values: fit the"):
        ov_static.load_static_layers(_copy(model), tmp_path)


def test_layers_timed_faster_one_call_each_than_their_exit_graph_keep_that_in_the_folder(static_pair, tmp_path):
    """eek fit's choice of the layer loop over the exit graph (runtime_choice.LAYER_LOOP) travels with the layers:
    saved, loaded, copied; a value that is not true or false is refused with what to do."""
    model, static = static_pair
    chosen = _copy(static)
    for layer in chosen.base_model.encoder.layer:
        layer.exit_graph_on = False
    ov_static.save_static_layers(chosen, tmp_path)
    path = tmp_path / ov_static.FOLDER / "layers.json"
    record = json.loads(path.read_text())
    assert record["exit_graph"] is False
    loaded = ov_static.load_static_layers(_copy(model), tmp_path)
    assert not any(layer.exit_graph_on for layer in loaded.base_model.encoder.layer)
    assert not _copy(loaded.base_model.encoder.layer[0]).exit_graph_on
    path.write_text(json.dumps({**record, "exit_graph": "off"}))
    with pytest.raises(ValueError, match="exit_graph is 'off', not true or false: fit the folder again"):
        ov_static.load_static_layers(_copy(model), tmp_path)


def test_missing_or_foreign_layer_files_are_one_clear_error(static_pair, tmp_path):
    model, static = static_pair
    with pytest.raises(
        ValueError,
        match="names static int8 layers but .* cannot be read .*: fit the folder again with eek fit --dtype int8",
    ):
        ov_static.load_static_layers(_copy(model), tmp_path)
    ov_static.save_static_layers(static, tmp_path)
    record = tmp_path / ov_static.FOLDER / "layers.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "layers": 5}))
    with pytest.raises(ValueError, match="holds 5 static int8 layers and the model has 2: they are another model's"):
        ov_static.load_static_layers(_copy(model), tmp_path)


def test_8_bit_weights_are_refused_where_the_cpu_s_int8_kernels_would_saturate(static_pair, monkeypatch):
    """A layer made on a CPU with VNNI has 8-bit weights; without VNNI the u8 x s8 kernels add pairs of products in
    saturating 16-bit sums, so such a layer is refused at its compilation there, saying to fit again (7 bits)."""
    model, static = static_pair
    layer = copy.deepcopy(static.base_model.encoder.layer[0])
    layer.weight_bits = 8
    from earlyexit_kernels.engine.layers import ov_layer

    monkeypatch.setattr(ov_layer, "int8_weight_bits", lambda: 7)
    monkeypatch.setattr(ov_layer, "int8_isa", lambda: "avx2")
    with pytest.raises(ValueError, match="this CPU's int8 class is avx2, .* Fit the folder again on this CPU"):
        layer.compiled()


def test_the_recipe_without_calibration_rows_says_how_its_layers_are_made():
    model = tiny_model("bert", num_layers=2)
    with pytest.raises(ValueError, match="sets its scales on calibration rows: eek fit --dtype int8 makes its layers"):
        int8_encoder(model, "static-ov")
    with pytest.raises(ValueError, match="not static int8 layers"):
        ov_static.save_static_layers(model, "/nonexistent")


# ------------------------------------------------------------------------------ eek fit, calibrate and serve


def test_eek_fit_saves_the_static_layers_it_certified_and_the_folder_serves_them(classifier, tmp_path, capsys):  # noqa: F811
    from conftest import write_table
    from test_fit_cli import FAST, _frame, _run

    from earlyexit_kernels.integrations.model_folder import load_model
    from earlyexit_kernels.patching.fit_record import FitRecord

    train = write_table(_frame(160, seed=42), tmp_path / "train.csv")
    out = tmp_path / "out"
    argv = (*FAST, "--dtype", "int8", "--layers", "openvino-static", "--device", "cpu")
    assert _run("fit", classifier, train, out, *argv) == 0
    record = FitRecord.load(out)
    assert record.int8_recipe == "static-ov" and record.int8_layers["by"] == "asked"
    saved = json.loads((out / ov_static.FOLDER / "layers.json").read_text())
    assert saved["calibration_rows"] == 144  # the training rows (160 less the 0.1 validation split), at most 300
    # the exit graph's compilation timed at the fitted policy on training rows (whichever won), kept with the layers
    graph = record.int8_layers["exit_graph_settings"]
    assert (
        graph["name"] in ("default", "fused-subgraph code generation off", "the layer loop")
        and saved["exit_graph_settings"] == (graph["settings"])
        and saved["exit_graph"] is graph["graph"] is (graph["name"] != "the layer loop")
    )
    assert graph["reason"].startswith(("the exit graph: ", "no exit graph: ")) and graph["seconds"]["default"]
    assert graph["reason"] in capsys.readouterr().out.splitlines()  # said, beside the layers' line
    model, tokenizer = load_model(str(out), dtype="int8")
    assert model.eek_int8_recipe == "static-ov"
    assert all(isinstance(layer, ov_static.StaticOvLayer) for layer in model.base_model.encoder.layer)
    assert all(
        dict(layer.exit_graph_settings) == graph["settings"] and layer.exit_graph_on is graph["graph"]
        for layer in model.base_model.encoder.layer
    )
    # certified anew with --layers auto: on the static layers the folder holds
    rows = write_table(_frame(80, seed=44), tmp_path / "rows.csv")
    assert _run("calibrate", out, rows, "--dtype", "int8", "--confidence", "off", "--force") == 0
    assert FitRecord.load(out).int8_recipe == "static-ov" and (out / ov_static.FOLDER / "layer_00.xml").is_file()


def test_static_layers_asked_of_a_folder_without_them_are_one_clear_line(classifier, tmp_path, capsys):  # noqa: F811
    from conftest import write_table
    from test_fit_cli import FAST, _frame, _run

    train = write_table(_frame(120, seed=42), tmp_path / "train.csv")
    assert _run("fit", classifier, train, tmp_path / "out", *FAST) == 0
    capsys.readouterr()
    rows = write_table(_frame(60, seed=44), tmp_path / "rows.csv")
    assert _run("calibrate", tmp_path / "out", rows, "--dtype", "int8", "--layers", "openvino-static") == 2
    assert "cannot be read" in capsys.readouterr().err


@pytest.mark.skipif(not ort_available(), reason=ORT_MISSING)
def test_a_call_openvino_fails_runs_on_onnx_runtime_s_per_token_layer_logged_once(static_pair, caplog, monkeypatch):
    """A model OpenVINO cannot compile (its IR broken): the call is answered by ONNX Runtime's per-token graph of the
    same layer, another quantization, which the log line says, once."""
    from earlyexit_kernels.engine.layers import ov_layer

    monkeypatch.setattr(ov_layer, "_logged_failures", set())  # once per process: this test's own
    model, static = static_pair
    layer = copy.deepcopy(static.base_model.encoder.layer[0])
    layer.ir = (b"<net>not an OpenVINO model</net>", layer.ir[1])
    per_token = OrtLayer.from_layer(
        model.base_model.encoder.layer[0], model.config, reduce_range=layer.weight_bits == 7
    )
    feeds = ov_static.calibration_feeds(model, _batches(model, count=1, rows=6, seed=5))[0][0]
    with caplog.at_level("WARNING", logger="earlyexit_kernels.layers"):
        first, second = _layer_out(layer, feeds), _layer_out(layer, feeds)
    torch.testing.assert_close(first, _layer_out(per_token, feeds), rtol=0, atol=0)
    assert torch.equal(first, second)
    failures = [r.getMessage() for r in caplog.records if "OpenVINO failed a layer call" in r.getMessage()]
    assert len(failures) == 1 and "int8 per token, not the static layer's scales" in failures[0]


def test_a_fit_s_tries_each_set_their_own_static_layers_and_the_folder_keeps_the_kept_try_s(
    classifier,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
):
    """--tries: every try sets its static layers' scales on its own draw of rows; the folder serves the layers of
    the try it keeps, the ones its certificate was made on (it served the first try's)."""
    import contextlib

    from conftest import write_table
    from test_fit_cli import _frame, _run

    from earlyexit_kernels.integrations import int8_fit
    from earlyexit_kernels.training import fit_tries

    made = []
    original = int8_fit.int8_base

    @contextlib.contextmanager
    def recorded(*args, **kwargs):
        with original(*args, **kwargs) as (reference, choice):
            yield reference, choice
        made.append(choice)

    monkeypatch.setattr(int8_fit, "int8_base", recorded)
    draw = int8_fit.calibration_batches

    # the first try sets its scales on 8 rows of its draw, the second on all of its own: the layers saved say
    # which try's they are by their calibration rows
    def drawn(*args, **kwargs):
        batches = draw(*args, **kwargs)
        return batches if made else [{name: value[:8] for name, value in batches[0].items()}]

    monkeypatch.setattr(int8_fit, "calibration_batches", drawn)
    monkeypatch.setattr(fit_tries, "kept_try", lambda summaries: len(summaries) - 1)  # the last try kept
    # without labels, as test_fit_tries' int8 tries, at a budget loose enough for few rows to certify each try
    train = write_table(_frame(300, seed=11, labels=None), tmp_path / "train.parquet")
    out = tmp_path / "out"
    settings = ("--max-drop", "15", "--epochs", "1", "--no-progress", "--calibration-fraction", "0.25")
    argv = (*settings, "--dtype", "int8", "--layers", "openvino-static", "--tries", "2")
    assert _run("fit", classifier, train, out, *argv) == 0, capsys.readouterr().err
    saved = json.loads((out / ov_static.FOLDER / "layers.json").read_text())["calibration_rows"]
    rows = [choice.static_layers[0].calibration_rows for choice in made]  # each try's, as it left int8_base
    assert rows[0] < rows[1] and saved == rows[1]  # the kept try's layers, not the first's
    # the exit graph's compilation, timed by the first try only, is the kept layers' too
    first = made[0].exit_graph
    assert first is not None and made[1].exit_graph is None
    assert json.loads((out / ov_static.FOLDER / "layers.json").read_text())["exit_graph_settings"] == dict(
        first.settings
    )


def test_the_row_padding_benchmark_adds_rows_no_real_row_reads(static_pair):
    """benchmarks/micro/static_row_padding.py: a call's rows padded to a multiple of the step with zero rows whose keys
    are all masked; through every layer the real tokens' outputs are the unpadded call's (to the rounding of rows run
    beside other rows, as above), and each pass reads its seconds and the bytes in use."""
    import importlib.util
    from pathlib import Path

    model, static = static_pair
    layers = list(static.base_model.encoder.layer)
    if layers[0].position_bias:
        pytest.skip("the benchmark times BERT-style layers (MPNet's take the encoder's position bias)")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "micro" / "static_row_padding.py"
    spec = importlib.util.spec_from_file_location("static_row_padding", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    batch = _batches(model, count=1, rows=5, seed=4)[0]
    mask = batch["attention_mask"]
    with torch.inference_mode():
        hidden = static.base_model.embeddings(input_ids=batch["input_ids"])
        padded_hidden, padded_mask = bench.padded_rows(hidden, mask, 8)
        assert padded_hidden.shape[0] == padded_mask.shape[0] == 8 and int(padded_mask[5:].sum()) == 0
        assert torch.equal(padded_hidden[:5], hidden) and int(padded_hidden[5:].abs().sum()) == 0
        assert bench.padded_rows(hidden, mask, 5)[0] is hidden  # on the step already: nothing added
        plain, padded = bench.full_depth(layers, hidden, mask, 1), bench.full_depth(layers, hidden, mask, 8)
    assert padded.shape == plain.shape == hidden.shape
    real = mask.bool()
    torch.testing.assert_close(padded[real], plain[real], rtol=1e-4, atol=1e-4)
    readings = bench.run_passes(layers, [(hidden, mask)], 8, passes=2)
    assert [r["first"] for r in readings] == [True, False, False]
    assert all(r["seconds"] > 0 and r["in_use_mib"] > 0 for r in readings)
    texts = [f"t{i}" for i in range(9)]
    assert bench.draw_calls(texts, 4, 3, seed=1) == bench.draw_calls(texts, 4, 3, seed=1)  # the same calls every run
