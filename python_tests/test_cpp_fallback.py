"""Without a loadable earlyexit_kernels._C the package warns once and falls back."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    sys.path.insert(0, {tests!r})
    {hide}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import earlyexit_kernels as eek
        import importlib
        importlib.import_module("earlyexit_kernels.backends.cpp_backend")  # a second import: no second warning
    import torch
    from conftest import tiny_batch, tiny_model
    ids, mask, tt = tiny_batch(5, 8)
    results = {{}}
    for backend in ("auto", "torch"):
        model = eek.patch(tiny_model("bert"), eek.Patience(1), backend=backend)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        results[backend] = [out.exit_layer.tolist(), out.logits.tolist()]
    try:
        eek.patch(tiny_model("bert"), eek.Patience(1), backend="cpp")
        cpp_error = None
    except RuntimeError as err:
        cpp_error = str(err)
    print(json.dumps({{
        "warnings": [str(w.message) for w in caught if "C++ backend" in str(w.message)],
        "backends": eek.backends(),
        "status": eek.backend_status(),
        "auto_equals_torch": results["auto"] == results["torch"],
        "cpp_error": cpp_error,
    }}))
    """
)

HIDE_NOT_BUILT = 'sys.modules["earlyexit_kernels._C"] = None'
HIDE_BROKEN = textwrap.dedent(
    """
    import importlib.abc
    class _Broken(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "earlyexit_kernels._C":
                raise ImportError("undefined symbol: _ZN3c104impl_fake (simulated by the test)")
    sys.meta_path.insert(0, _Broken())
    """
)
HIDE_OTHER_TORCH = 'import torch; torch.__version__ = torch.__version__ + ".other"'


def _probe(hide: str) -> dict:
    code = PROBE.format(tests=str(ROOT / "python_tests"), hide=hide.strip())
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "hide,reason",
    [
        (HIDE_NOT_BUILT, "not built"),
        (HIDE_BROKEN, "undefined symbol"),
        (HIDE_OTHER_TORCH, "built for torch"),
    ],
    ids=["not-built", "fails-to-load", "other-torch"],
)
def test_fallback_without_extension(hide, reason):
    result = _probe(hide)
    assert len(result["warnings"]) == 1, result["warnings"]
    assert reason in result["warnings"][0]
    assert result["backends"]["cpp"] is False and result["backends"]["cuda"] is False
    assert result["backends"]["torch"] is True
    assert reason in result["status"]["cpp"] and reason in result["status"]["cuda"]
    assert result["auto_equals_torch"]
    assert result["cpp_error"] is not None and reason in result["cpp_error"]
