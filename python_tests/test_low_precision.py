"""Early exit in bfloat16 and float16 on the CPU: a model cast with ``.to(dtype)``, and autocast.

The exactness contract in the model's own dtype (docs/usage.md, "Combining with int8, bf16
and torch.compile"): where nobody exits, the patched model's logits are the unpatched model's
bit for bit, on every backend, in the per-batch engine and in ``eek.classify`` (with calls of
one unpadded row, the shapes of the model on one sequence alone); under
``torch.autocast("cpu", torch.bfloat16)`` both engines return the autocast dtype, as the
unpatched model does.
"""

import pytest
import torch
from conftest import TRITON_COMPILED, tiny_batch, tiny_model
from threshold_helpers import midway, randomize_heads

import earlyexit_kernels as eek
from earlyexit_kernels.methods.exit_rules import entropy

pytestmark = [
    pytest.mark.exact,  # same ops, order and inputs: bit for bit on any CPU (make test-cpu-kinds)
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # the Triton interpreter's masked lanes
]

LAYERS = 4
BACKENDS = ("torch", "cpp", "triton")


def skip_missing(backend: str) -> None:
    if not eek.backends()[backend]:
        pytest.skip(f"backend {backend!r}: {eek.backend_status()[backend]}")
    if backend == "triton" and TRITON_COMPILED:
        pytest.skip("this file is the CPU's contract; with a GPU, Triton compiles for CUDA tensors only")


def unpadded_items(ids, mask):
    return [{"input_ids": row[: int(m.sum())].tolist()} for row, m in zip(ids, mask)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_model_where_nobody_exits_is_the_unpatched_model_bit_for_bit(dtype, backend):
    skip_missing(backend)
    model = tiny_model("bert", num_layers=LAYERS).to(dtype)
    ids, mask, token_types = tiny_batch(6, 12)
    items = unpadded_items(ids, mask)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        alone = [model(input_ids=torch.tensor([item["input_ids"]])).logits[0] for item in items]
        eek.patch(model, eek.Entropy(0.0), backend=backend)  # entropy is never below 0
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    assert out.logits.dtype == dtype and torch.equal(out.logits, reference)
    predictions = list(eek.classify(model, items, max_batch_size=1, length_step=1))
    for prediction, expected in zip(predictions, alone):
        assert prediction.logits.dtype == dtype and torch.equal(prediction.logits, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_where_nobody_exits_is_the_unpatched_model_under_autocast_bit_for_bit(backend):
    skip_missing(backend)
    model = tiny_model("bert", num_layers=LAYERS)
    ids, mask, token_types = tiny_batch(6, 12)
    items = unpadded_items(ids, mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        alone = [model(input_ids=torch.tensor([item["input_ids"]])).logits[0] for item in items]
        eek.patch(model, eek.Entropy(0.0), backend=backend)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        predictions = list(eek.classify(model, items, max_batch_size=1, length_step=1))
    assert reference.dtype == torch.bfloat16
    assert out.logits.dtype == torch.bfloat16 and torch.equal(out.logits, reference)
    for prediction, expected in zip(predictions, alone):
        assert prediction.logits.dtype == torch.bfloat16 and torch.equal(prediction.logits, expected)


@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_classify_with_one_row_calls_is_the_patched_model_alone_when_rows_exit(backend, mode):
    skip_missing(backend)
    model = tiny_model("bert", num_layers=LAYERS)
    if mode == "bfloat16":
        model.to(torch.bfloat16)
    ids, mask, _ = tiny_batch(10, 12, seed=5)
    items = unpadded_items(ids, mask)
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with torch.no_grad(), context:
        eek.patch(model, eek.Entropy(0.5), backend="torch")
        randomize_heads(model, 4)
        z = model(input_ids=ids, attention_mask=mask, return_all_exits=True).all_logits.float()
        eek.patch(model, eek.Entropy(midway(entropy(z), entropy(z[0]))), backend=backend)
        predictions = list(eek.classify(model, items, max_batch_size=1, length_step=1))
        alone = [model(input_ids=torch.tensor([item["input_ids"]])) for item in items]
    assert len({p.exit_layer for p in predictions}) >= 2, "the exits should spread over the layers"
    for prediction, expected in zip(predictions, alone):
        assert prediction.exit_layer == int(expected.exit_layer)
        assert torch.equal(prediction.logits, expected.logits[0])
