"""The int8 form each CPU takes, and why it is exact there (issue 95; :mod:`earlyexit_kernels.engine.layers.int8_isa`).

Without VNNI, fbgemm's and ONNX Runtime's u8 x s8 GEMMs add each pair of products in a saturating 16-bit
sum; full-range operands overflow it. The form there is 7-bit weights and 8-bit activations, which no
pair sum can overflow (2 x 255 x 63 = 32,130). The reference beside the kernel: the same quantized
operands multiplied in float64, exact at these sizes. ``make test-cpu-kinds`` reruns these tests with
fbgemm capped at AVX2 (``FBGEMM_ENABLE_INSTRUCTIONS``), as on an AVX2-only CPU.
"""

import os
import platform
import shlex
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from earlyexit_kernels.engine.layers import int8_isa as int8_isa_module
from earlyexit_kernels.engine.layers.int8_isa import int8_weight_bits, isa_class, kernel_flags
from earlyexit_kernels.engine.layers.int8_linear import PerTokenInt8Linear

pytestmark = pytest.mark.int8_kernels
warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*")

needs_avx2 = pytest.mark.skipif("avx2" not in kernel_flags(), reason="fbgemm's int8 kernels need AVX2")
#: the emulator this process runs under, if any (``make test-cpu-kinds``' emulated level sets it): a subprocess
#: started without it would run on the host's CPU
EMULATOR = shlex.split(os.environ.get("EEK_TEST_EMULATOR", ""))


def integer_reference(layer: PerTokenInt8Linear, x: torch.Tensor, *, reduce_activations: bool) -> torch.Tensor:
    """What the layer computes without rounding or saturation: its int8 weights times the activations quantized
    as fbgemm quantizes them (one step for the call's rows, each divided by its largest magnitude), in float64."""
    weight = layer._packed_params._weight_bias()[0]
    levels, weight_scales = weight.int_repr().double(), weight.q_per_channel_scales().double()
    magnitude = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    rows = x / magnitude
    scale, zero = torch._choose_qparams_per_tensor(rows, reduce_activations)
    quantized = torch.quantize_per_tensor(rows, scale, zero, torch.quint8).int_repr().double() - zero
    return ((quantized @ levels.T) * scale * weight_scales).float() * magnitude + layer.bias


def kernel_and_reference_gaps(seed: int = 0) -> dict[str, float]:
    """For a 1536 -> 384 projection (MiniLM's feed-forward output): how far the kernel is from the integer
    reference, relative to the output's norm, in this CPU's form and in the full-range one (8-bit weights and
    activations, fbgemm's kernel called directly)."""
    torch.manual_seed(seed)
    linear, x = nn.Linear(1536, 384), torch.randn(64, 1536)
    with torch.no_grad():
        norm = float(linear(x).norm())
        ours = PerTokenInt8Linear.from_float(linear)
        full = PerTokenInt8Linear.from_float(linear, reduce_range=False)
        magnitude = x.abs().amax(-1, keepdim=True)
        full_range = torch.ops.quantized.linear_dynamic(x / magnitude, full._packed_params._packed_params, False)
        full_range = full_range * magnitude + full.bias
        return {
            "ours": float((ours(x) - integer_reference(ours, x, reduce_activations=False)).norm()) / norm,
            "full": float((full_range - integer_reference(full, x, reduce_activations=False)).norm()) / norm,
        }


_CAPPED = """
import json, warnings
warnings.filterwarnings("ignore")
import test_int8_form as t
from earlyexit_kernels.engine.layers.int8_isa import int8_isa, int8_weight_bits
print(json.dumps({"isa": int8_isa(), "bits": int8_weight_bits(), **t.kernel_and_reference_gaps()}))
"""


def run_capped(cap: str) -> dict:
    """:func:`kernel_and_reference_gaps` and the class in a process whose fbgemm is capped at ``cap``."""
    import json

    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": cap, "PYTHONPATH": os.path.dirname(__file__)}
    command = [*EMULATOR, sys.executable, "-c", _CAPPED]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("isa, bits", [("vnni", 8), ("avx512", 7), ("avx2", 7), ("aarch64", 7), ("x86", 7)])
def test_weights_take_8_bits_only_where_the_gemms_accumulate_exactly(isa, bits):
    assert int8_weight_bits(isa) == bits


def test_this_cpus_form_is_the_integer_reference():
    gaps = kernel_and_reference_gaps()
    # measured: 7.7e-8 (float rounding of the scales) on an AVX-512 VNNI Xeon, in both forms
    assert gaps["ours"] < 1e-4, gaps


@needs_avx2
def test_without_vnni_the_7_bit_form_is_exact_where_full_range_operands_saturate():
    capped = run_capped("AVX2")  # fbgemm's AVX2 kernels, as on an AVX2-only CPU
    assert (capped["isa"], capped["bits"]) == ("avx2", 7)
    # measured with fbgemm's AVX2 kernels: 7.7e-8 in the 7-bit form, 0.12 in the full-range one (its pair sums
    # saturate): the reference sees the overflow the form avoids
    assert capped["ours"] < 1e-4 < 1e-2 < capped["full"], capped


@needs_avx2
def test_fbgemms_cap_sets_the_class_and_an_unknown_cap_leaves_the_cpus_own():
    assert run_capped("avx512")["isa"] in ("avx512", "avx2")  # AVX-512 without VNNI, where the CPU has AVX-512
    assert run_capped("no-such-cap")["isa"] == isa_class(kernel_flags(), platform.machine())  # the CPU's own


def test_a_layer_with_8_bit_weights_takes_7_bit_activations_where_the_cpu_lacks_vnni(monkeypatch):
    """A layer made on a VNNI CPU and loaded on another (a pickle sent to a Ray worker, say) does not saturate:
    its activations take fbgemm's 7 bits there."""
    from earlyexit_kernels.engine.layers import int8_linear

    torch.manual_seed(1)
    linear, x = nn.Linear(64, 32), torch.randn(8, 64)
    layer = PerTokenInt8Linear.from_float(linear, reduce_range=False)
    monkeypatch.setattr(int8_linear, "int8_weight_bits", lambda: 7)
    with torch.no_grad():
        got = layer(x)
        expected = integer_reference(layer, x, reduce_activations=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, exact_kernel", [(7, "1"), (8, None)])
def test_onnx_runtime_moves_8_bit_weights_to_its_exact_kernel_only_without_vnni(monkeypatch, bits, exact_kernel):
    """Without VNNI a graph made elsewhere with 8-bit weights runs exact; with VNNI the option would move them to
    the slower u8 kernel for nothing (half the speed on an AMX Xeon), so it is left off."""
    pytest.importorskip("onnxruntime")
    from earlyexit_kernels.engine.layers import ort_layer

    monkeypatch.setattr(ort_layer, "int8_weight_bits", lambda: bits)
    options = ort_layer.session_options(1)
    try:
        entry = options.get_session_config_entry("session.x64quantprecision")
    except RuntimeError:  # ONNX Runtime's way of saying the key was never set
        entry = None
    assert entry == exact_kernel


#: what the cpuinfo library reports on an AMD Zen 2 EPYC (the CPU of issue 95), in torch's names
ZEN2 = {"avx2": True, "fma3": True, "f16c": True, "avx512_f": False, "avx512_bw": False, "avx512_vnni": False}


def test_the_class_is_read_from_cpuid_as_the_kernels_read_it(monkeypatch):
    """fbgemm (through cpuinfo) and MLAS choose their kernels by CPUID; ``/proc/cpuinfo`` is the kernel's list,
    which an emulated CPU leaves as the host's. Read from there, the class gave 8-bit weights to AVX2 kernels that
    saturate on them (issue 95's failing test, reproduced under ``qemu-x86_64 -cpu EPYC-Rome`` on a VNNI host)."""
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: ZEN2)
    monkeypatch.setattr(int8_isa_module, "cpu_flags", lambda: {"avx2", "avx512bw", "avx512_vnni"})  # the host's
    int8_isa_module.int8_isa.cache_clear()
    try:
        assert kernel_flags() == {"avx2"}
        assert (int8_isa_module.int8_isa(), int8_weight_bits()) == ("avx2", 7)
    finally:
        int8_isa_module.int8_isa.cache_clear()


def test_without_torchs_cpuid_reader_the_class_reads_proc_cpuinfo(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(int8_isa_module, "cpu_flags", lambda: {"avx2", "fma"})
    assert kernel_flags() == {"avx2", "fma"}
