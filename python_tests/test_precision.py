"""The base a model runs on: ``to_base(model, dtype, device)``, what ``--dtype`` and ``--device`` choose.

int8 quantizes the encoder's Linear layers with the recipe the family needs (MPNet keeps its
feed-forward output projections float), never the exit heads, the pooler or the classifier: the
fused per-layer step reads those as they are.
"""

import pytest
import torch
from conftest import mlp_head_model, tiny_batch, tiny_model
from torch import nn

import earlyexit_kernels as eek
from earlyexit_kernels.engine.precision import int8_encoder, int8_recipe, resolve_device, to_base


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
    to_base(model, "int8", "cpu")
    names = quantized_names(model)
    assert names and all(n.startswith("bert.encoder.") for n in names)
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    assert all(type(m) is not torch.ao.nn.quantized.dynamic.Linear for m in model.early_exit_heads.modules())
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, token_type_ids=types, return_all_exits=True)
    # int8 moves every layer's logits a little, not the answer of a random tiny model's final layer much
    torch.testing.assert_close(after.all_logits, before.all_logits, rtol=0.1, atol=0.1)
    assert eek.policy_of(model) == eek.Entropy(0.0)


def test_the_family_decides_the_int8_recipe():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    config = MPNetConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    mpnet = MPNetForSequenceClassification(config)
    assert int8_recipe(mpnet) == "ffn-out-float" and int8_recipe(tiny_model("bert")) == "all"
    kept = sorted(n for n, m in int8_encoder(mpnet).base_model.named_modules() if type(m) is nn.Linear)
    assert kept == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]


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
