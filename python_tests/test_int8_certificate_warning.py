"""int8 asks for its certificate (issue 63): a folder certified on float32 run on int8 warns once, with
the command that certifies it there; PyTorch's deprecation notices of its quantization stay out of sight."""

import json
import shutil
import warnings

import pytest
import torch

from earlyexit_kernels.engine.layers.int8_isa import isa_class
from earlyexit_kernels.engine.layers.precision import int8_encoder
from earlyexit_kernels.integrations.model_folder import certified_base, load_model
from earlyexit_kernels.patching.fit_record import FitRecord

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


# ------------------------------------------------------------------- the CPU class an int8 certificate holds for


@pytest.mark.parametrize(
    "flags, machine, expected",
    [
        ({"avx2", "avx512bw", "avx512_vnni"}, "x86_64", "vnni"),
        ({"avx2", "avx_vnni"}, "x86_64", "avx2"),  # Alder Lake, Sierra Forest: fbgemm has no AVX-VNNI kernels
        ({"avx2", "avx512bw"}, "x86_64", "avx512"),  # Skylake-SP: AVX-512 without VNNI
        ({"avx2", "fma", "f16c"}, "x86_64", "avx2"),  # Zen 2 / Zen 3 EPYC
        ({"sse4_2"}, "x86_64", "x86"),
        (set(), "aarch64", "aarch64"),
    ],
)
def test_a_cpu_is_classed_by_how_its_int8_gemms_accumulate(flags, machine, expected):
    assert isa_class(flags, machine) == expected


@pytest.mark.parametrize(
    "cap, expected", [("AVX2", "avx2"), ("avx512", "avx512"), ("AVX512_E1", "vnni"), ("no-such-cap", "vnni")]
)
def test_fbgemms_cap_classes_the_cpu_as_the_kernels_it_leaves(cap, expected):
    assert isa_class({"avx2", "avx512bw", "avx512_vnni"}, "x86_64", cap) == expected


def _int8_folder(saved_classifier, tmp_path, isa):
    folder = _folder(saved_classifier, tmp_path, certificate=CERTIFICATE, base="int8", int8_recipe="per-token")
    if isa is not None:
        record = json.loads((tmp_path / "folder" / "eek_fit.json").read_text())
        (tmp_path / "folder" / "eek_fit.json").write_text(json.dumps({**record, "int8_isa": isa}))
    return folder


def test_int8_on_another_cpu_class_than_certified_warns_with_the_command_that_certifies_it_there(
    saved_classifier, tmp_path, monkeypatch
):
    from earlyexit_kernels.integrations import model_folder

    monkeypatch.setattr(model_folder, "int8_isa", lambda: "avx2")
    folder = _int8_folder(saved_classifier, tmp_path, "vnni")
    (message,) = _loaded_warnings(folder, "int8")
    assert "certified on int8 on a vnni CPU; this one is avx2" in message
    assert "eek calibrate COPY ROWS --dtype int8" in message


@pytest.mark.parametrize("recorded, here", [("avx2", "avx2"), (None, "avx2"), ("vnni", "unknown")])
def test_no_warning_on_the_class_certified_on_or_where_either_is_not_known(
    saved_classifier, tmp_path, monkeypatch, recorded, here
):
    from earlyexit_kernels.integrations import model_folder

    monkeypatch.setattr(model_folder, "int8_isa", lambda: here)
    assert _loaded_warnings(_int8_folder(saved_classifier, tmp_path, recorded), "int8") == []


def test_a_record_keeps_its_int8_class_and_one_without_it_reads_as_before(tmp_path):
    FitRecord(report={"target": "accuracy"}, base="int8", int8_recipe="per-token", int8_isa="avx2").save(tmp_path)
    assert FitRecord.read(tmp_path).int8_isa == "avx2"
    FitRecord(report={"target": "accuracy"}).save(tmp_path)
    assert FitRecord.read(tmp_path).int8_isa is None
    assert "int8_isa" not in json.loads((tmp_path / "eek_fit.json").read_text())
