"""int8 asks for its certificate (issue 63): a folder certified on float32 run on int8 warns once, with
the command that certifies it there; PyTorch's deprecation notices of its quantization stay out of sight."""

import json
import shutil
import warnings

import pytest
import torch

from earlyexit_kernels.engine.precision import int8_encoder
from earlyexit_kernels.integrations.model_folder import certified_base, load_model

CERTIFICATE = {"budget": 0.01, "confidence": 0.95, "risk": "accuracy", "rows": 1500, "certified": True}


def _folder(saved_classifier, tmp_path, **summary):
    folder = tmp_path / "folder"
    shutil.copytree(saved_classifier, folder)
    if summary:
        (folder / "eek_fit.json").write_text(json.dumps({"target": "accuracy", **summary}))
    return str(folder)


def _loaded_warnings(folder, dtype):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(folder, dtype=dtype)
    return [str(w.message) for w in caught]


def test_int8_on_a_float32_certificate_warns_with_the_command_that_certifies_it(saved_classifier, tmp_path):
    folder = _folder(saved_classifier, tmp_path, certificate=CERTIFICATE)
    assert certified_base(folder) == "float32"
    (message,) = _loaded_warnings(folder, "int8")
    assert "certified on float32" in message and "eek calibrate COPY ROWS --dtype int8" in message


@pytest.mark.parametrize(
    "summary, dtype",
    [
        ({"certificate": CERTIFICATE, "base": "int8"}, "int8"),  # certified there
        ({"certificate": CERTIFICATE}, "float32"),  # the base eek fit certified on
        ({}, "int8"),  # nothing certified: nothing to warn about
    ],
)
def test_no_warning_where_the_base_is_the_certified_one_or_nothing_is_certified(
    saved_classifier, tmp_path, summary, dtype
):
    assert _loaded_warnings(_folder(saved_classifier, tmp_path, **summary), dtype) == []


def test_a_folder_certified_on_int8_run_without_dtype_warns_that_float32_is_not_what_was_certified(
    saved_classifier, tmp_path
):
    folder = _folder(saved_classifier, tmp_path, certificate=CERTIFICATE, base="int8")
    (message,) = _loaded_warnings(folder, None)
    assert "certified on the int8 base; without --dtype it runs as saved, on float32" in message
    assert "give --dtype int8" in message
    with warnings.catch_warnings(record=True) as caught:  # a caller that certifies it, or loads it as a reference
        warnings.simplefilter("always")
        load_model(folder, certified_here=True)
    assert [str(w.message) for w in caught] == []


def test_pytorchs_quantization_deprecation_notices_are_not_shown(saved_classifier):
    model, _ = load_model(saved_classifier)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = int8_encoder(model)
        with torch.no_grad():
            quantized(input_ids=torch.tensor([[2, 5, 6, 3]]))
    assert [str(w.message) for w in caught] == []
