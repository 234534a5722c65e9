"""Where a served float32 model's encoder layers run (earlyexit_kernels.engine.layers.served_layers).

``auto`` swaps every encoder layer of a float32 CPU model for its ONNX Runtime float32 graph, whose
every exit's logits are the PyTorch model's up to float rounding; it keeps PyTorch's layers, saying
why, where the graph cannot run them; ``onnxruntime`` refuses the same cases by name; ``torch``
leaves the model alone; an int8 model keeps its recipe's layers. ``eek serve --layers`` offers the
same choices, and a served model's ``/info`` says where its layers run. ``openvino`` runs the same
graphs on OpenVINO where it is installed, and the ``per-token-ov`` int8 recipe its int8 form.
"""

import copy
import re

import pytest
import torch
from conftest import mlp_head_model, tiny_batch

from earlyexit_kernels.engine.layers import served_layers
from earlyexit_kernels.engine.layers.ort_layer import ORT_MISSING, OrtLayer, ort_available
from earlyexit_kernels.engine.layers.ov_layer import OV_MISSING, ov_available
from earlyexit_kernels.engine.layers.precision import to_base
from earlyexit_kernels.engine.layers.served_layers import SERVED_LAYERS, layers_of, prepare_layers, serve_layers

needs_ort = pytest.mark.skipif(not ort_available(), reason="onnxruntime and onnx are not installed")
needs_ov = pytest.mark.skipif(not ov_available(), reason=OV_MISSING)


def all_logits(model):
    ids, mask, types = tiny_batch(6, 12)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, token_type_ids=types, return_all_exits=True).all_logits


@pytest.mark.parametrize(
    "asked, runtime, says",
    [
        pytest.param("auto", "onnxruntime", "float32 on ONNX Runtime", marks=needs_ort),
        pytest.param("openvino", "openvino", "float32 on OpenVINO", marks=needs_ov),
    ],
)
def test_a_float32_cpu_model_s_layers_run_on_the_runtime_asked_with_the_same_logits(asked, runtime, says):
    from earlyexit_kernels.engine.layers.ov_layer import OvLayer

    model = mlp_head_model(seed=5)
    expected = all_logits(model)
    line = serve_layers(model, asked)
    assert says in line and layers_of(model) == runtime
    kind = {"onnxruntime": OrtLayer, "openvino": OvLayer}[runtime]
    assert all(isinstance(layer, kind) for layer in model.bert.encoder.layer)
    # every exit's logits, float rounding apart (float32's resolution at these magnitudes: ~1e-7)
    torch.testing.assert_close(all_logits(model), expected, rtol=0, atol=1e-5)
    assert serve_layers(model, runtime) == line  # already there: nothing to swap


@pytest.mark.parametrize(
    "make, compiled, says",
    [
        (lambda m: m.to(torch.bfloat16), False, "not float32"),
        (lambda m: m, True, "--compile"),
    ],
)
def test_auto_keeps_pytorch_s_layers_saying_why_and_onnxruntime_refuses(make, compiled, says):
    model = make(mlp_head_model(seed=5))
    assert says in serve_layers(model, "auto", compiled=compiled)
    assert layers_of(model) == "torch"
    with pytest.raises(ValueError, match=f"--layers onnxruntime: .*{says}.*--layers torch"):
        serve_layers(model, "onnxruntime", compiled=compiled)


def test_without_onnx_runtime_auto_says_what_to_install(monkeypatch):
    monkeypatch.setattr(served_layers, "ort_available", lambda: False)
    model = mlp_head_model(seed=5)
    assert ORT_MISSING in serve_layers(model, "auto") and layers_of(model) == "torch"


def test_torch_leaves_the_model_alone_and_an_unknown_choice_is_refused():
    model = mlp_head_model(seed=5)
    before = copy.deepcopy(model.state_dict())
    assert "PyTorch's modules" in serve_layers(model, "torch")
    assert layers_of(model) == "torch" and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="one of auto, onnxruntime, openvino, torch"):
        serve_layers(model, "onnx")


def test_an_int8_model_keeps_its_recipe_s_layers():
    model = to_base(mlp_head_model(seed=5), "int8", "cpu", int8_recipe="per-token")
    assert serve_layers(model, "auto") == "layers: int8 on PyTorch's kernels (the recipe per-token)"
    with pytest.raises(ValueError, match="per-token runs on PyTorch's kernels"):
        serve_layers(model, "onnxruntime")


def test_the_command_line_offers_the_engine_s_choices():
    from earlyexit_kernels.integrations import serve_cli

    assert serve_cli.SERVED_LAYERS == SERVED_LAYERS


def test_without_openvino_its_layers_are_refused_saying_what_to_install(monkeypatch):
    from earlyexit_kernels.engine.layers import ov_layer

    monkeypatch.setattr(ov_layer, "ov_available", lambda: False)
    with pytest.raises(ValueError, match=re.escape(f"--layers openvino: {OV_MISSING}; serve with --layers torch")):
        serve_layers(mlp_head_model(seed=5), "openvino")
    with pytest.raises(ValueError, match="per-token-ov: openvino and onnx are not installed .* per-token-ort"):
        to_base(mlp_head_model(seed=5), "int8", "cpu", int8_recipe="per-token-ov")


@needs_ov
def test_the_openvino_int8_recipe_runs_every_layer_there_and_keeps_its_runtime_when_served():
    model = to_base(mlp_head_model(seed=5), "int8", "cpu", int8_recipe="per-token-ov")
    assert layers_of(model) == "openvino" and model.eek_int8_recipe == "per-token-ov"
    assert serve_layers(model, "auto") == "layers: int8 on OpenVINO (the recipe per-token-ov)"
    layers = model.base_model.encoder.layer
    assert prepare_layers(model) == len(layers) and all(layer._compiled is not None for layer in layers)
    with pytest.raises(ValueError, match="--layers onnxruntime: the int8 recipe per-token-ov runs on OpenVINO"):
        serve_layers(model, "onnxruntime")


@needs_ort
def test_a_server_makes_every_runtime_layer_s_session_before_its_first_request(saved_classifier):
    """A runtime layer makes its session at its first call unless prepared: then the first requests to reach each
    layer pay for it (MPNet-base int8: the slowest of the first 8 requests 682 ms, against 90 ms prepared). A server
    prepares them as it starts, and says so; PyTorch's layers have nothing to prepare."""
    pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
    pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
    pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
    from served_models import serving

    from earlyexit_kernels.integrations.model_folder import load_model

    model, tokenizer = load_model(saved_classifier)
    assert prepare_layers(model) == 0  # PyTorch's layers
    serve_layers(model, "onnxruntime")
    layers = model.base_model.encoder.layer
    assert all(layer._session is None for layer in layers)
    with serving(model, tokenizer) as server:
        assert all(layer._session is not None for layer in layers)  # before any request
        state = server.app.state.eek
        assert state.prepared_line.startswith(f"layers: {len(layers)} runtime sessions made at start-up in ")
        sessions = [layer._session for layer in layers]
        answer = server.post("/predict", {"inputs": "a request after the start"})
        assert answer.status_code == 200, answer.text
        assert [layer._session for layer in layers] == sessions  # the request made none
