"""Packed execution: a BERT-style layer run on its valid tokens only equals the layer on the padded batch.

:func:`earlyexit_kernels.engine.layers.packed_layer.run_packed` is the fast path, the layer module itself the
reference (on every position, op by op, it is the module bit for bit); the continuous engine runs it where a call pads much (``packed=None``), on every padded
call (``packed=True``) or never (``packed=False``), with the same predictions as each sequence alone.
"""

import pytest
import torch
from conftest import tiny_model
from test_classify import _alone, _sequences, spread_model

import earlyexit_kernels as eek
from earlyexit_kernels.backends.compaction import layer_attention_mask
from earlyexit_kernels.engine.engines.continuous.engine import ContinuousEngine
from earlyexit_kernels.engine.layers.packed_layer import OpByOpLayer, run_packed, splits_into_token_parts

pytestmark = pytest.mark.exact  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)


def _padded_batch(width, lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    return torch.randn(len(lengths), longest, width, generator=generator), mask


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_packed_layer_equals_the_layer_at_every_valid_position(arch, attn):
    model = tiny_model(arch, attn=attn)
    layer = model.base_model.encoder.layer[1]
    hidden, mask = _padded_batch(32, [17, 3, 9, 1, 12])
    layer_mask = layer_attention_mask(mask, attn, torch.float32)
    positions = torch.nonzero(mask.reshape(-1)).squeeze(1)
    with torch.no_grad():
        reference = layer(hidden, layer_mask)
        packed = run_packed(layer, hidden, positions, layer_mask)
    torch.testing.assert_close(packed[mask], reference[mask], rtol=0, atol=1e-6)
    assert torch.count_nonzero(packed[~mask]) == 0  # padding holds zeros, never stale values


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_layer_op_by_op_on_every_position_is_the_layer_bit_for_bit(arch, attn, padded):
    model = tiny_model(arch, attn=attn)
    layer = model.base_model.encoder.layer[1]
    hidden, mask = _padded_batch(32, [17, 3, 9, 1, 12] if padded else [11] * 4, seed=1)
    layer_mask = layer_attention_mask(mask, attn, torch.float32) if padded else None
    with torch.no_grad():
        assert torch.equal(run_packed(layer, hidden, None, layer_mask), layer(hidden, layer_mask))


class _ScaledOutput(torch.nn.Module):
    """An output block of a custom model: BERT's parts, another forward."""

    def __init__(self, stock):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = stock.dense, stock.LayerNorm, stock.dropout

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(0.5 * self.dense(hidden_states) + input_tensor)


@pytest.mark.parametrize("positions", [False, True])
def test_blocks_that_are_not_stock_run_through_their_modules(positions):
    model = tiny_model("bert")
    layer = model.bert.encoder.layer[1]
    layer.output = _ScaledOutput(layer.output)  # another forward
    layer.attention.self.query = torch.ao.quantization.quantize_dynamic(
        torch.nn.Sequential(layer.attention.self.query), {torch.nn.Linear}, dtype=torch.qint8
    )[0]  # a quantized linear: called as it is
    hidden, mask = _padded_batch(32, [7, 5, 2], seed=2)
    layer_mask = layer_attention_mask(mask, "eager", torch.float32)
    flat = torch.nonzero(mask.reshape(-1)).squeeze(1) if positions else None
    with torch.no_grad():
        reference = layer(hidden, layer_mask)
        got = run_packed(layer, hidden, flat, layer_mask)
    # int8 dynamic quantization scales by the range of what it is given: packed, the valid tokens only
    torch.testing.assert_close(got[mask], reference[mask], rtol=0, atol=1e-5 if positions else 0)
    stock = run_packed(tiny_model("bert").bert.encoder.layer[1], hidden, flat, layer_mask)
    assert (got[mask] - stock[mask]).abs().max() > 1e-2  # the custom forward and the int8 weights did count


def test_only_bert_style_layers_split_into_token_parts():
    assert splits_into_token_parts(tiny_model("bert").bert.encoder.layer[0])
    assert splits_into_token_parts(tiny_model("roberta").roberta.encoder.layer[0])
    albert = tiny_model("albert").albert.encoder.albert_layer_groups[0].albert_layers[0]
    assert not splits_into_token_parts(albert)
    relative = tiny_model("bert").bert.encoder.layer[0]
    relative.attention.self.distance_embedding = torch.nn.Embedding(7, 16)  # older transformers' relative positions
    assert not splits_into_token_parts(relative)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("packed", [True, False, None])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_packed_and_padded_calls_give_the_predictions_of_the_model_alone(arch, packed, attn):
    items = _sequences(40, seed=4, longest=48)
    model, _ = spread_model(arch, "entropy", items)
    model.config._attn_implementation = attn  # sdpa: calls on every position run the C++ layer where it is built
    engine = ContinuousEngine(model, max_batch_size=8, max_in_flight=16, packed=packed)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    finished = sorted(engine.run(), key=lambda done: done.key)
    assert [done.key for done in finished] == list(range(len(items)))
    for done, item in zip(finished, items):
        alone = _alone(model, item)
        assert done.exit_layer == int(alone.exit_layer)
        torch.testing.assert_close(done.logits, alone.logits[0], rtol=0, atol=1e-5)
    padded_calls = engine.stats.calls - engine.stats.packed_calls
    if packed is True:
        assert engine.stats.packed_calls > 0
    elif packed is False:
        assert engine.stats.packed_calls == 0
    else:  # only the calls whose real tokens are under the threshold: some, not all
        assert 0 < engine.stats.packed_calls and padded_calls > 0
    natives = {layer.native is not None for layer in engine._op_layers if layer is not None}
    assert natives == {attn == "sdpa" and eek.backends()["cpp"]}


def test_packed_is_refused_where_layers_do_not_split_or_calls_are_compiled():
    items = _sequences(4, seed=1)
    model, _ = spread_model("albert", "entropy", items)
    with pytest.raises(ValueError, match="not split so"):
        ContinuousEngine(model, packed=True)
    model, _ = spread_model("bert", "entropy", items)
    with pytest.raises(ValueError, match="compile is on"):
        ContinuousEngine(model, packed=True, compile=True)
    with pytest.raises(ValueError, match="packed must be"):
        ContinuousEngine(model, packed="yes")
    list(eek.classify(model, items, packed=False))  # accepted by classify too


def test_a_layer_with_forward_hooks_runs_through_its_module_so_they_fire():
    items = _sequences(24, seed=5, longest=48)
    model, _ = spread_model("bert", "entropy", items)
    seen = []
    handle = model.bert.encoder.layer[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    try:
        engine = ContinuousEngine(model, max_batch_size=8, max_in_flight=16, packed=True)
        for index, item in enumerate(items):
            engine.submit(index, item["input_ids"], item["token_type_ids"])
        finished = list(engine.run())
    finally:
        handle.remove()
    first_layer_calls = len(seen)
    assert first_layer_calls == 3  # 24 sequences in calls of 8: every layer-1 call ran the module
    assert engine.stats.packed_calls > 0  # the other layers, without hooks, ran packed
    assert len(finished) == len(items)


def test_transformers_own_output_capturing_hooks_do_not_stop_packed_calls():
    items = _sequences(24, seed=6, longest=48)
    model, _ = spread_model("bert", "entropy", items)
    with torch.no_grad():
        # a first forward that collects hidden states installs them on every layer
        model.bert(input_ids=torch.tensor([items[0]["input_ids"]]), output_hidden_states=True)
    assert model.bert.encoder.layer[0]._forward_hooks  # idle outside output_hidden_states
    engine = ContinuousEngine(model, max_batch_size=8, max_in_flight=16, packed=True)
    for index, item in enumerate(items):
        engine.submit(index, item["input_ids"], item["token_type_ids"])
    finished = sorted(engine.run(), key=lambda done: done.key)
    assert engine.stats.packed_calls > 0
    for done, item in zip(finished, items):
        alone = _alone(model, item)
        assert done.exit_layer == int(alone.exit_layer)
        torch.testing.assert_close(done.logits, alone.logits[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_activations_run_as_the_function_only_where_the_module_is_transformers_gelu(act):
    from transformers.activations import ACT2FN

    layer = tiny_model("bert").base_model.encoder.layer[1]
    layer.intermediate.intermediate_act_fn = ACT2FN[act]
    op_layer = OpByOpLayer(layer)
    assert (op_layer.activation is torch.nn.functional.gelu) == (act == "gelu")
    hidden, mask = _padded_batch(32, [17, 3, 9], seed=2)
    layer_mask = layer_attention_mask(mask, "sdpa", torch.float32)
    with torch.no_grad():
        assert torch.equal(op_layer(hidden, None, layer_mask), layer(hidden, layer_mask))


def test_a_hook_on_the_activation_keeps_it_a_module_call():
    layer = tiny_model("bert").base_model.encoder.layer[1]
    calls = []
    layer.intermediate.intermediate_act_fn.register_forward_hook(lambda *args: calls.append(1))
    op_layer = OpByOpLayer(layer)
    with torch.no_grad():
        op_layer(*_padded_batch(32, [5, 5], seed=3)[:1], None, None)
    assert calls == [1]


def test_the_op_by_op_layer_keeps_the_graph_where_grad_is_on():
    layer = tiny_model("bert").base_model.encoder.layer[1]
    hidden, mask = _padded_batch(32, [7, 4], seed=4)
    hidden.requires_grad_(True)
    layer_mask = layer_attention_mask(mask, "sdpa", torch.float32)
    out = OpByOpLayer(layer)(hidden, None, layer_mask)  # out of place: the activations backward needs stay
    out.sum().backward()
    expected = torch.autograd.grad(layer(hidden, layer_mask).sum(), hidden)[0]
    assert torch.equal(hidden.grad, expected)


def _without_query_bias(layer):
    layer.attention.self.query.bias = None


@pytest.mark.parametrize(
    "attn, change, native",
    [
        ("sdpa", None, True),
        ("eager", None, False),  # another attention function
        ("sdpa", lambda layer: setattr(layer.intermediate, "intermediate_act_fn", _act("gelu_new")), False),
        ("sdpa", _without_query_bias, False),
    ],
)
def test_the_layer_runs_as_one_cpp_operator_only_where_that_computes_the_same(attn, change, native):
    if not eek.backends()["cpp"]:
        pytest.skip(f"backend 'cpp': {eek.backend_status()['cpp']}")
    layer = tiny_model("bert", attn=attn).base_model.encoder.layer[1]
    if change is not None:
        change(layer)
    op_layer = OpByOpLayer(layer)
    assert (op_layer.native is not None) == native
    hidden, mask = _padded_batch(32, [17, 3, 9, 1], seed=5)
    layer_mask = layer_attention_mask(mask, attn, torch.float32)
    with torch.no_grad():
        assert torch.equal(op_layer(hidden, None, layer_mask), layer(hidden, layer_mask))


def _act(name):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def test_the_engine_gives_sdpa_layers_the_additive_mask_sdpa_makes_of_the_boolean_one():
    items = _sequences(8, seed=3)
    model, _ = spread_model("bert", "entropy", items)
    model.config._attn_implementation = "sdpa"
    engine = ContinuousEngine(model, max_batch_size=8)
    _, mask = _padded_batch(32, [7, 2, 5], seed=6)
    additive = engine._layer_mask(mask)
    boolean = layer_attention_mask(mask, "sdpa", torch.float32)
    assert additive.dtype == torch.float32 and additive.shape == boolean.shape
    assert torch.equal(additive == 0, boolean) and bool((additive[~boolean] == float("-inf")).all())
    layer = model.base_model.encoder.layer[0]
    hidden = torch.randn(3, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(layer(hidden, additive), layer(hidden, boolean))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # SDPA's mask would be bfloat16 there: the boolean one
        assert engine._layer_mask(mask).dtype == torch.bool
    model.config._attn_implementation = "eager"  # eager attention takes its own additive mask
    assert torch.equal(engine._layer_mask(mask), layer_attention_mask(mask, "eager", torch.float32))


def test_the_cpp_layer_refuses_bad_arguments_by_name():
    if not eek.backends()["cpp"]:
        pytest.skip(f"backend 'cpp': {eek.backend_status()['cpp']}")
    layer = OpByOpLayer(tiny_model("bert", attn="sdpa").base_model.encoder.layer[1])
    weights = [module._parameters[name] for module, name in layer.native_parameters]
    hidden = torch.randn(2, 5, 32)
    op = torch.ops.earlyexit.cpp_bert_layer.default
    with pytest.raises(RuntimeError, match="16 weights expected"):
        op(hidden, None, weights[:-1], 1e-12, 1e-12, 16, 0.25)
    with pytest.raises(RuntimeError, match=r"hidden must be \[n, S, H\]"):
        op(hidden[0], None, weights, 1e-12, 1e-12, 16, 0.25)
    with pytest.raises(RuntimeError, match="head_size 7 does not divide"):
        op(hidden, None, weights, 1e-12, 1e-12, 7, 0.25)
