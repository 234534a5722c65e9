"""Early exit on an int8 model: torch.ao's dynamic quantization and torchao's int8 schemes, in either order.

What holds (docs/usage.md, "Combining with int8, bf16 and torch.compile"):

- ``eek.patch`` on a quantized model and quantizing a patched model both run, in both engines;
- a batch in which nobody exits gives the quantized unpatched model's logits bit for bit.
  Dynamic int8 quantizes each Linear's input with one scale for the whole tensor, so a
  row's values depend on the rows beside it: the comparison is on the same batch;
- a quantized head is not fused: every backend runs the head modules, then its own exit step,
  and gives the torch backend's results bit for bit;
- ``eek.classify`` with calls of one unpadded row (the shapes of the model on that sequence
  alone) gives the patched quantized model on that sequence alone, bit for bit.
"""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from threshold_helpers import midway, randomize_heads
from torch import nn

import earlyexit_kernels as eek
from earlyexit_kernels.backends.registry import resolve_backend
from earlyexit_kernels.engine.step.batch_loop import can_fuse_head
from earlyexit_kernels.methods.exit_rules import entropy
from earlyexit_kernels.patching.patch import current_adapter

pytestmark = [
    pytest.mark.exact,  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the Triton interpreter's masked lanes
]

LAYERS = 4
ORDERS = ("quantize_then_patch", "patch_then_quantize")
BACKENDS = ("torch", "cpp", "triton")


def torch_ao_int8(model):
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _torchao(config_name: str):
    def quantize(model):
        quantization = pytest.importorskip("torchao.quantization", reason="torchao is not installed (optional)")
        quantization.quantize_(model, getattr(quantization, config_name)())
        return model

    return quantize


QUANTIZERS = {
    "torch_ao_dynamic_int8": torch_ao_int8,
    "torchao_int8_weight_only": _torchao("Int8WeightOnlyConfig"),
    "torchao_int8_dynamic": _torchao("Int8DynamicActivationInt8WeightConfig"),
}


def skip_missing(backend: str) -> None:
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r}: {eek.backend_status()[backend]}")


def quantized_patched(order: str, quantize, policy, backend: str = "torch", arch: str = "bert", seed: int = 4):
    """A tiny model quantized before or after patching, with distinct exit heads (randomized while float)."""
    model = tiny_model(arch, num_layers=LAYERS)
    if order == "quantize_then_patch":
        model = quantize(model)
        eek.patch(model, policy, backend=backend)
        randomize_heads(model, seed)  # the heads eek.patch adds are float Linears
    else:
        eek.patch(model, policy, backend=backend)
        randomize_heads(model, seed)
        model = quantize(model)
    return model


def spread_threshold(order: str, quantize, ids, mask) -> float:
    """An entropy threshold midway between layer 1's values: about half the rows leave there."""
    model = quantized_patched(order, quantize, eek.Entropy(0.5))
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=mask, return_all_exits=True).all_logits.float()
    return midway(entropy(z), entropy(z[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize("order", ORDERS)
def test_a_batch_where_nobody_exits_gives_the_quantized_model_bit_for_bit(order, quantizer, backend):
    skip_missing(backend)
    quantize = QUANTIZERS[quantizer]
    ids, mask, token_types = tiny_batch(6, 12)
    with torch.no_grad():
        model = quantized_patched(order, quantize, eek.Entropy(0.0), backend)  # entropy is never below 0
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        # the same quantized object unpatched: its quantized weights are the ones the patched forward ran
        reference = eek.unpatch(model)(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
    assert out.exit_layer.tolist() == [LAYERS] * 6
    assert torch.equal(out.logits, reference)


@pytest.mark.parametrize("arch", ["albert", "roberta"])
@pytest.mark.parametrize("order", ORDERS)
def test_other_families_quantized_match_too(order, arch):
    ids, mask, _ = tiny_batch(5, 10)
    with torch.no_grad():
        model = quantized_patched(order, torch_ao_int8, eek.Entropy(0.0), arch=arch)
        out = model(input_ids=ids, attention_mask=mask)
        reference = eek.unpatch(model)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.logits, reference)


@pytest.mark.parametrize("quantizer", sorted(QUANTIZERS))
@pytest.mark.parametrize("order", ORDERS)
def test_quantized_heads_are_not_fused_and_float_heads_are(order, quantizer):
    if not eek.backends()["cpp"]:
        pytest.skip(f"backend 'cpp': {eek.backend_status()['cpp']}")
    cpp = resolve_backend("cpp", torch.device("cpu"))
    model = quantized_patched(order, QUANTIZERS[quantizer], eek.Entropy(0.3), "cpp")
    float_model = eek.patch(tiny_model("bert", num_layers=LAYERS), eek.Entropy(0.3), backend="cpp")
    with torch.no_grad():
        assert can_fuse_head(cpp, current_adapter(float_model))
        assert not can_fuse_head(cpp, current_adapter(model))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("order", ORDERS)
def test_every_backend_gives_the_torch_backend_result_bit_for_bit(order, backend):
    skip_missing(backend)
    ids, mask, token_types = tiny_batch(10, 12, seed=5)
    policy = eek.Entropy(spread_threshold(order, torch_ao_int8, ids, mask))
    with torch.no_grad():
        expected = quantized_patched(order, torch_ao_int8, policy, "torch")(input_ids=ids, attention_mask=mask)
        out = quantized_patched(order, torch_ao_int8, policy, backend)(input_ids=ids, attention_mask=mask)
    assert len(set(expected.exit_layer.tolist())) >= 2, "the exits should spread over the layers"
    assert torch.equal(out.exit_layer, expected.exit_layer)
    assert torch.equal(out.logits, expected.logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
def test_classify_with_one_row_calls_equals_the_model_alone_bit_for_bit(order, backend):
    skip_missing(backend)
    ids, mask, _ = tiny_batch(10, 12, seed=5)
    policy = eek.Entropy(spread_threshold(order, torch_ao_int8, ids, mask))
    model = quantized_patched(order, torch_ao_int8, policy, backend)
    items = [{"input_ids": row[: int(m.sum())].tolist()} for row, m in zip(ids, mask)]
    predictions = list(eek.classify(model, items, max_batch_size=1, length_step=1))
    exits = set()
    with torch.no_grad():
        for prediction, item in zip(predictions, items):
            alone = model(input_ids=torch.tensor([item["input_ids"]]))
            assert prediction.exit_layer == int(alone.exit_layer)
            assert torch.equal(prediction.logits, alone.logits[0])
            exits.add(prediction.exit_layer)
    assert len(exits) >= 2, "the exits should spread over the layers"


@pytest.mark.parametrize("order", ORDERS)
def test_classify_in_batches_runs_every_policy_head_on_a_quantized_model(order):
    """Batched layer calls share one activation scale per Linear input, so the logits move by the
    int8 rounding of the rows beside them; the predictions still exit where the heads say."""
    ids, mask, _ = tiny_batch(10, 12, seed=5)
    items = [{"input_ids": row[: int(m.sum())].tolist()} for row, m in zip(ids, mask)]
    for policy in (eek.QExit(q=0.4), eek.SkipGates(skip_threshold=0.5, entropy_threshold=0.5), eek.Patience(1)):
        model = quantized_patched(order, torch_ao_int8, policy)
        predictions = list(eek.classify(model, items, max_batch_size=4))
        assert [p.index for p in predictions] == list(range(len(items)))
        assert all(1 <= p.layers_run <= p.exit_layer <= LAYERS for p in predictions)
        assert all(torch.isfinite(p.logits).all() for p in predictions)
