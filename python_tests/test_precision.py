"""The base a model runs on: ``to_base(model, dtype, device)``, what ``--dtype`` and ``--device`` choose.

int8 quantizes the encoder's Linear layers with the recipe the family needs (MPNet keeps its
feed-forward output projections float), never the exit heads, the pooler or the classifier: the
fused per-layer step reads those as they are.
"""

import pytest
import torch
from conftest import mlp_head_model, tiny_batch, tiny_model, tiny_mpnet
from torch import nn

import earlyexit_kernels as eek
from earlyexit_kernels.engine.layers import precision
from earlyexit_kernels.engine.layers.int8_linear import PerTokenInt8Linear
from earlyexit_kernels.engine.layers.ort_layer import ort_available
from earlyexit_kernels.engine.layers.precision import (
    FAMILY_INT8_RECIPES,
    INT8_RECIPES,
    int8_encoder,
    int8_recipe,
    resolve_device,
    to_base,
)


def quantized_names(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if type(m) is not nn.Linear and "Linear" in type(m).__name__)


def test_auto_is_the_gpu_where_there_is_one_and_cuda_without_one_says_what_to_use():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch .* use --device cpu or auto"):
            resolve_device("cuda")


def test_int8_quantizes_the_encoder_and_leaves_heads_pooler_and_classifier_float():
    model = mlp_head_model(seed=3)
    ids, mask, types = tiny_batch(5, 10)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, token_type_ids=types, return_all_exits=True)
    to_base(model, "int8", "cpu", int8_recipe="per-token")
    names = quantized_names(model)
    assert names and all(n.startswith("bert.encoder.") for n in names)
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    assert all(type(m) is not torch.ao.nn.quantized.dynamic.Linear for m in model.early_exit_heads.modules())
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, token_type_ids=types, return_all_exits=True)
    # int8 moves every layer's logits a little, not the answer of a random tiny model's final layer much
    torch.testing.assert_close(after.all_logits, before.all_logits, rtol=0.1, atol=0.1)
    assert eek.policy_of(model) == eek.Entropy(0.0)


def kinds(model) -> dict[str, str]:
    """Each encoder Linear's kind (float, dynamic, per-token), by name."""
    names = {nn.Linear: "float", torch.ao.nn.quantized.dynamic.Linear: "dynamic", PerTokenInt8Linear: "per-token"}
    return {
        n: names[type(m)]
        for n, m in model.base_model.named_modules()
        if type(m) in names and not n.startswith("pooler")
    }


def test_the_family_decides_the_int8_recipe_and_a_family_without_one_is_told_what_runs_instead():
    mpnet, bert = tiny_mpnet(), tiny_model("bert")
    # the family's recipe, or the same quantization on PyTorch's kernels where ONNX Runtime is not installed
    for model, family in ((mpnet, "mpnet"), (bert, "bert")):
        assert int8_recipe(model) == (FAMILY_INT8_RECIPES[family] if ort_available() else "per-token")
    assert set(FAMILY_INT8_RECIPES.values()) <= set(INT8_RECIPES)
    quantized = int8_encoder(mpnet)
    assert quantized.eek_int8_recipe == int8_recipe(mpnet) and not hasattr(mpnet, "eek_int8_recipe")
    roberta = tiny_model("roberta")
    with pytest.raises(ValueError, match=r"int8 has no recipe for the roberta family.*Run --dtype bfloat16 or float32"):
        to_base(roberta, "int8", "cpu")
    assert kinds(roberta) and set(kinds(roberta).values()) == {"float"}  # refused before any change
    assert int8_encoder(roberta, "all").eek_int8_recipe == "all"  # a recipe chosen by hand still runs


@pytest.mark.parametrize(
    ("recipe", "ffn_out", "other"),
    [
        ("all", "dynamic", "dynamic"),
        ("ffn-out-float", "float", "dynamic"),
        ("per-token", "per-token", "per-token"),
        ("ffn-out-per-token", "per-token", "dynamic"),
    ],
)
def test_each_recipe_quantizes_the_linears_it_says(recipe, ffn_out, other):
    got = kinds(int8_encoder(tiny_mpnet(), recipe))
    assert len(got) == 12  # 2 layers: q, k, v, o, intermediate, output
    assert {k for n, k in got.items() if n.endswith("output.dense")} == {ffn_out}
    assert {k for n, k in got.items() if not n.endswith("output.dense")} == {other}
    with pytest.raises(ValueError, match="int8 recipe must be auto or one of all, ffn-out-float, per-token"):
        int8_encoder(tiny_mpnet(), "fp8")


def test_per_token_scales_keep_the_tokens_an_outlier_channel_would_flatten():
    """The reason for the recipe: one large input channel (the GELU's outliers feeding MPNet's
    feed-forward output) sets a per-tensor scale's step for every token; a per-token one does not."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    x = torch.randn(40, 256)
    x[:4, 7] = 400.0  # four tokens with an outlier in one channel
    with torch.no_grad():
        exact = linear(x)
        per_token = PerTokenInt8Linear.from_float(linear)(x)
        per_tensor = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)(x)
    ordinary = slice(4, None)

    def error(got):
        return float((got[ordinary] - exact[ordinary]).norm() / exact[ordinary].norm())

    assert error(per_token) < 0.02 < 0.2 < error(per_tensor)
    assert float((per_token[:4] - exact[:4]).norm() / exact[:4].norm()) < 0.1  # the outlier tokens themselves
    shaped = PerTokenInt8Linear.from_float(linear)(x.reshape(5, 8, 256))  # any leading shape
    torch.testing.assert_close(shaped.reshape(40, 64), per_token)


def test_int8_on_a_gpu_says_what_runs_there(monkeypatch):
    monkeypatch.setattr(precision, "resolve_device", lambda name: torch.device("cuda"))
    with pytest.raises(ValueError, match="dtype int8 runs on the CPU only .* use --device cpu, or --dtype bfloat16"):
        to_base(tiny_model("bert"), "int8", "cuda")


def test_bfloat16_and_float32_cast_the_whole_model_and_bad_bases_are_refused():
    model = mlp_head_model(seed=4)
    assert next(to_base(model, "bfloat16", "cpu").parameters()).dtype == torch.bfloat16
    assert next(to_base(model, "float32", "cpu").parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, int8; got 'float16'"):
        to_base(model, "float16", "cpu")


def test_classify_runs_a_copy_on_the_base_it_is_given():
    model = mlp_head_model(seed=5)
    ids, mask, _ = tiny_batch(6, 11)
    inputs = [{"input_ids": row[m.bool()]} for row, m in zip(ids, mask)]
    as_saved = [p.logits for p in eek.classify(model, inputs)]
    as_int8 = [p.logits for p in eek.classify(model, inputs, dtype="int8", device="cpu")]
    assert quantized_names(model) == []  # the caller's model is untouched
    torch.testing.assert_close(torch.stack(as_int8), torch.stack(as_saved), rtol=0.1, atol=0.1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        list(eek.classify(model, inputs, dtype="fp8"))
