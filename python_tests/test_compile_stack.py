"""torch.compile on a patched model: the per-batch forward (``torch.compile(model, dynamic=True)``) and the
continuous engine's layer calls (``eek.classify(..., compile=...)``), in float32, bfloat16 and int8.

What holds (docs/usage.md, "Combining with int8, bf16 and torch.compile"): the compiled forward
gives the eager forward's exits and logits; once a warm-up stream has taken the engine's paths
(rows leaving, the batch compacted and its padding trimmed), batches of other sizes and lengths
compile nothing new. The tests compile with Dynamo's ``"eager"`` backend (the same graphs and
guards as inductor, without its code generation, which is slow on a CPU); the benchmark
(``python -m benchmarks.suite.stack``) measures inductor.
"""

import pytest
import torch
from conftest import tiny_batch, tiny_model
from threshold_helpers import midway, randomize_heads
from torch import nn

import earlyexit_kernels as eek
from earlyexit_kernels.methods.exit_rules import entropy

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

LAYERS = 2
WARM_UP = [(8, 12), (6, 10), (5, 9), (3, 7), (7, 11), (9, 12)]
LATER = [(10, 12), (2, 9), (7, 7), (4, 5)]


def spread_model(variant: str, backend: str = "torch"):
    """A tiny 2-layer SDPA BERT with randomized exit heads and an entropy threshold midway between
    layer 1's values, cast or quantized as ``variant`` says (``fp32``, ``bf16``, ``int8``)."""
    model = tiny_model("bert", num_layers=LAYERS, attn="sdpa")
    if variant == "bf16":
        model.to(torch.bfloat16)
    eek.patch(model, eek.Entropy(0.5), backend=backend)
    randomize_heads(model, 4)
    ids, mask, _ = tiny_batch(32, 12, seed=77)
    with torch.no_grad():
        z = model(input_ids=ids, attention_mask=mask, return_all_exits=True).all_logits.float()
    eek.patch(model, eek.Entropy(midway(entropy(z), entropy(z[0]))), backend=backend)
    if variant == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return model


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_batches(compiled, model, shapes, seed):
    """Each batch through the compiled and the eager forward; returns the rows that exited early."""
    early = 0
    with torch.no_grad():
        for i, (rows, length) in enumerate(shapes):
            ids, mask, _ = tiny_batch(rows, length, seed=seed + i)
            out = compiled(input_ids=ids, attention_mask=mask)
            expected = model(input_ids=ids, attention_mask=mask)
            assert torch.equal(out.exit_layer, expected.exit_layer)
            torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)
            early += int((expected.exit_layer < LAYERS).sum())
    return early


@pytest.mark.parametrize("variant, backend", [("fp32", "cpp"), ("bf16", "torch"), ("int8", "torch")])
def test_compiled_forward_matches_eager_and_compiles_nothing_new_after_warm_up(variant, backend):
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r}: {eek.backend_status()[backend]}")
    torch._dynamo.reset()
    model = spread_model(variant, backend)
    compiled = torch.compile(model, backend="eager", dynamic=True)
    assert run_batches(compiled, model, WARM_UP, seed=0) > 0, "some rows should leave at layer 1"
    warm = graphs()
    assert run_batches(compiled, model, LATER, seed=100) > 0
    assert graphs() == warm, "batches of other sizes and lengths compiled new graphs"
    if backend == "cpp" and variant == "fp32":  # the compiled forward runs the fused per-layer step
        ids, mask, _ = tiny_batch(*LATER[0], seed=100)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            compiled(input_ids=ids, attention_mask=mask)
        assert "earlyexit::cpp_pooled_head_exit_step" in {event.name for event in prof.events()}


@pytest.mark.parametrize("variant, atol", [("bf16", 1e-2), ("int8", 1e-4)])
def test_compiled_continuous_engine_matches_eager_and_compiles_nothing_new_on_a_second_stream(variant, atol):
    """Traced layer calls may round otherwise than eager ones (within ``atol``); two compiled passes agree bit for bit."""
    torch._dynamo.reset()
    model = spread_model(variant)
    items = [{"input_ids": row[: int(m.sum())].tolist()} for row, m in zip(*tiny_batch(24, 12, seed=9)[:2])]
    eager = list(eek.classify(model, items, max_batch_size=4))
    first = list(eek.classify(model, items, max_batch_size=4, compile={"backend": "eager"}))
    warm = graphs()
    second = list(eek.classify(model, items, max_batch_size=4, compile={"backend": "eager"}))
    assert graphs() == warm, "the second stream compiled new graphs"
    assert len({p.exit_layer for p in eager}) == 2, "the exits should spread over the layers"
    for a, b, c in zip(eager, first, second):
        assert a.exit_layer == b.exit_layer == c.exit_layer
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=atol)
        assert torch.equal(c.logits, b.logits)
