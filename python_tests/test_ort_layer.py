"""An encoder layer run by ONNX Runtime (``OrtLayer``, the int8 recipe ``per-token-ort``).

The reference beside it: in float32 the graph is the layer itself; in int8 it is the layer with
its Linear layers ``PerTokenInt8Linear`` (the ``per-token`` recipe: the same quantization on
PyTorch's kernels), up to the rounding of two int8 kernels, which is far below what int8 itself
moves.
"""

import subprocess
import sys

import layer_calls
import pytest
import torch
from conftest import tiny_batch, tiny_model, tiny_mpnet
from layer_calls import MODELS, additive, padded_input, run

from earlyexit_kernels.engine.layers import precision
from earlyexit_kernels.engine.layers.ort_layer import OrtLayer, ort_available, run_on_ort
from earlyexit_kernels.engine.layers.precision import int8_encoder, int8_recipe

pytestmark = pytest.mark.skipif(not ort_available(), reason="onnxruntime and onnx are not installed")


@pytest.mark.parametrize("family", MODELS)
def test_the_float_graph_is_the_layer(family):
    layer_calls.assert_float_layer_is_the_layer(OrtLayer, family)


@pytest.mark.int8_kernels
@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_the_int8_graph_is_the_per_token_layer_up_to_the_kernels_rounding(family):
    for kernel_difference, int8_error, output, _ in layer_calls.int8_layer_errors(OrtLayer, family):
        # Both take this CPU's one form and accumulate it exactly (32-bit sums with VNNI; without it, 7-bit weights
        # that no 16-bit pair sum can overflow: python_tests/test_int8_form.py), so they differ by float rounding
        # alone, on every x86 CPU. Measured on these layers: 0.0007-0.024 of what int8 moves (VNNI), 0.0005
        # (fbgemm capped at AVX2); int8 moves 0.011% of the output's norm (the layer norm dominates a tiny layer).
        assert kernel_difference < 0.2 * int8_error
        assert 0 < int8_error < 1e-3 * output


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_each_row_is_what_it_is_alone_and_every_mask_form_is_read(family):
    layer_calls.assert_rows_alone_and_every_mask_form(OrtLayer, family)


def test_a_mask_shared_by_a_call_s_layers_is_read_once_and_again_after_an_in_place_write(monkeypatch):
    """The key mask and the token positions are worked out once for the mask tensor a call's layers share; the
    same tensor written in place, or another one, is read again, and every layer's output is the uncached one's."""
    from earlyexit_kernels.engine.layers import ort_layer

    model = MODELS["bert"]()
    layers = [OrtLayer.from_layer(layer, model.config, int8=False) for layer in model.base_model.encoder.layer]
    hidden, mask = padded_input(n=6, length=12, seed=5)
    reads, original = [], ort_layer._key_mask
    monkeypatch.setattr(ort_layer, "_key_mask", lambda *args: reads.append(args) or original(*args))
    shared = additive(mask)
    with torch.no_grad():
        outputs = [layer(hidden, shared) for layer in layers]
        assert len(reads) == 1
        fresh = [layer(hidden, additive(mask)) for layer in layers]  # a new tensor each call: read each time
        assert len(reads) == 1 + len(layers)
        for got, expected in zip(outputs, fresh):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        shorter = mask.clone()
        shorter[:, 6:] = False
        shared.copy_(additive(shorter))  # written in place: its version moves, so it is read again
        after = layers[0](hidden, shared)
        assert len(reads) == 2 + len(layers)
        torch.testing.assert_close(after, layers[0](hidden, additive(shorter)), rtol=0, atol=0)


def test_a_model_run_under_inference_mode_reads_its_mask_at_every_layer():
    """Tensors made under ``torch.inference_mode`` have no version counter to tell an in-place write by: their
    mask is read at every layer, and the outputs are those of ``no_grad``."""
    model = MODELS["bert"]()
    run_on_ort(model, int8=False)
    ids, mask, types = tiny_batch(4, 10)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_the_padding_is_never_read_and_comes_back_as_zeros(family, int8):
    layer_calls.assert_padding_never_read(OrtLayer, family, int8)


def test_a_copy_or_a_pickle_makes_its_own_session_and_a_new_thread_count_a_new_one():
    layer_calls.assert_copies_rebuild(OrtLayer, "_session")


def test_every_session_shares_one_arena_and_keeps_no_memory_pattern_per_shape():
    # a server sees calls of every shape: per-session arenas extended to the next power of two and a memory
    # pattern per shape grew its resident memory over a soak (docs/serving.md, "What a server keeps")
    from earlyexit_kernels.engine.layers.ort_layer import shared_cpu_arena

    model = tiny_model("bert", num_layers=2)
    layers = [OrtLayer.from_layer(layer, model.config) for layer in model.base_model.encoder.layer]
    assert shared_cpu_arena() is True
    for rows, length in ((1, 3), (2, 7), (5, 4), (3, 11)):  # shapes that vary, as served calls do
        hidden, mask = padded_input(rows, length, seed=rows)
        expected = hidden
        for layer, torch_layer in zip(layers, model.base_model.encoder.layer, strict=True):
            hidden = run(layer, model, hidden, mask)
            expected = run(torch_layer, model, expected, mask)
        torch.testing.assert_close(hidden, expected, rtol=0, atol=5e-3)  # int8 against float32: at most 7.3e-4 here
    for layer in layers:
        options = layer.session().get_session_options()
        assert options.enable_mem_pattern is False
        assert options.get_session_config_entry("session.use_env_allocators") == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and glibc's malloc_trim")
def test_a_shrink_request_hands_back_what_a_large_call_grew_the_arena_by():
    """The shared arena keeps the largest call's need; after ``request_arena_shrink`` (what the
    server's memory trim asks every 10 s) the next call hands it back to the system."""
    from earlyexit_kernels.engine.layers.ort_layer import request_arena_shrink
    from earlyexit_kernels.integrations.server.memory_trim import _glibc_malloc_trim, resident_bytes

    trim = _glibc_malloc_trim()
    if trim is None:
        pytest.skip("the C library is not glibc: its free memory would blur the arena's")
    model = tiny_model("bert", num_layers=2)
    layer = OrtLayer.from_layer(model.base_model.encoder.layer[0], model.config)

    def resident_after(rows, length):
        run(layer, model, *padded_input(rows, length, seed=1))
        trim(0)
        return resident_bytes()

    resident_after(2, 8)
    request_arena_shrink()  # start from an arena without an earlier test's growth
    before = resident_after(2, 8)
    grown = resident_after(48, 512) - before  # the attention scores alone: 48 x 2 x 512 x 512 floats
    kept = resident_after(2, 8) - before
    request_arena_shrink()
    after = resident_after(2, 8) - before
    assert grown > 64 * 2**20, grown  # the premise: a call that grows the arena
    assert kept > grown / 2, (kept, grown)  # without a request the arena keeps it
    assert after < grown / 2, (after, grown)
    assert resident_after(2, 8) - before < grown / 2  # one shrink per request: later calls run as before


# A served engine's calls, in a process of their own (one arena a process, read without other tests' memory):
# two int8 layers (hidden 128) called on 400 batches of 1-32 rows of 8-96 tokens, a few answers kept, and every
# 20 calls what eek serve's memory trim does (glibc's trim, a reading, a shrink where ArenaShrinkRule asks).
_SERVED_CALLS = """
import random, sys
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertLayer
from earlyexit_kernels.engine.layers.ort_layer import OrtLayer, request_arena_shrink
from earlyexit_kernels.integrations.server.memory_trim import ArenaShrinkRule, _glibc_malloc_trim, resident_bytes

torch.set_num_threads(1)
torch.manual_seed(0)
config = BertConfig(hidden_size=128, num_attention_heads=4, intermediate_size=512, hidden_act="gelu")
layers = [OrtLayer.from_layer(BertLayer(config).eval(), config, int8=True) for _ in range(2)]
trim, rule, draw, kept, readings = _glibc_malloc_trim(), ArenaShrinkRule(), random.Random(0), [], []
for call in range(400):
    rows, length = draw.randint(1, 32), draw.randint(8, 96)
    hidden = torch.randn(rows, length, 128)
    with torch.no_grad():
        for layer in layers:
            hidden = layer(hidden, torch.zeros(rows, 1, 1, length))
    kept = [*kept[-63:], hidden[:, 0].clone()]
    if call % 20 == 19:
        trim(0)
        readings.append(resident_bytes())
        if rule.should_shrink(readings[-1]):
            request_arena_shrink()
print(rule.shrinks, *readings)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and glibc's malloc_trim")
def test_served_calls_of_every_shape_hold_resident_memory_flat_under_the_memory_trim():
    """The shared arena grows by regions that double, which calls of other shapes reuse. Grown by exactly what
    each call asked (``arena_extend_strategy`` 1, the default before), this run's memory sawed over 9.3% of
    itself after its first 100 calls (the shrink handing regions back, the calls after it growing new ones);
    doubling, it held within 0.15% (2 shrinks). A served MiniLM-L6 did the same over 120 s
    (``benchmarks/results/amd_epyc/memory_soak_cpu/minilm_float32_arena_ab.json``)."""
    from earlyexit_kernels.integrations.server.memory_trim import _glibc_malloc_trim

    if _glibc_malloc_trim() is None:
        pytest.skip("the C library is not glibc: no trim to run")
    out = subprocess.run([sys.executable, "-c", _SERVED_CALLS], capture_output=True, text=True, check=True).stdout
    shrinks, *readings = map(int, out.split())
    settled = readings[5:]  # after the first 100 calls: the arena's first growth and the rule's first shrink
    assert (max(settled) - min(settled)) / settled[0] < 0.045, (shrinks, readings)  # about midway: 0.15% and 9.3%


@pytest.mark.int8_kernels
def test_the_recipe_runs_every_encoder_layer_on_onnx_runtime_and_leaves_the_heads_float():
    got, per_token, exact = layer_calls.recipe_logits("per-token-ort", OrtLayer)
    # every layer's logits: the same quantization, two kernels' rounding apart, far less than int8 moves them
    # (measured: 1.9e-6 against 1.1e-3 at most)
    assert float((got - per_token).abs().max()) < 0.05 * float((per_token - exact).abs().max())


def test_the_family_takes_the_onnx_runtime_recipe_where_it_is_installed_and_per_token_where_not(monkeypatch):
    bert, mpnet = tiny_model("bert"), tiny_mpnet()
    assert int8_recipe(bert) == int8_recipe(mpnet) == "per-token-ort"
    monkeypatch.setattr(precision, "ort_available", lambda: False)
    assert int8_recipe(bert) == int8_recipe(mpnet) == "per-token"
    with pytest.raises(ValueError, match=r"per-token-ort: onnxruntime and onnx are not installed .*per-token recipe"):
        int8_encoder(bert, "per-token-ort")


def test_layers_the_graph_cannot_run_are_refused_with_what_runs_instead():
    with pytest.raises(ValueError, match=r"BERT-style and MPNet layers; AlbertLayerGroup is neither.*per-token"):
        albert = tiny_model("albert", hidden_act="gelu")
        OrtLayer.from_layer(albert.albert.encoder.albert_layer_groups[0], albert.config)
    tanh_gelu = tiny_model("bert", hidden_act="gelu_new")
    with pytest.raises(ValueError, match=r"runs the erf GELU; bert's layers use 'gelu_new'. Run the per-token"):
        int8_encoder(tanh_gelu, "per-token-ort")
