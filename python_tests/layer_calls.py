"""An encoder layer called as its encoder calls it, on padded rows: what the tests of the layers a runtime runs
from its graph (``test_ort_layer.py``, ``test_ov_layer.py``) compare against the torch layer, and the checks both
runtimes' layers pass alike (each row as alone, every mask form, padding never read, copies that rebuild)."""

import copy
import pickle

import torch
from conftest import tiny_model, tiny_mpnet

MODELS = {"bert": lambda: tiny_model("bert", num_layers=2), "bert-sdpa": lambda: tiny_model("bert", num_layers=2, attn="sdpa"), "mpnet": tiny_mpnet}  # fmt: skip


def padded_input(n=5, length=11, hidden=32, seed=0):
    """Hidden states [n, S, H] and the 2-D mask of rows of lengths 3..S (the first full)."""
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(n, length, hidden, generator=generator)
    lengths = torch.randint(3, length + 1, (n,), generator=generator)
    lengths[0] = length
    return hidden_states, torch.arange(length)[None] < lengths[:, None]


def additive(mask):
    return torch.where(mask, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]


def run(layer, model, hidden, mask):
    """The layer's output on ``hidden`` with ``mask``, as its encoder calls it; padding zeroed."""
    with torch.no_grad():
        if model.config.model_type == "mpnet":
            bias = model.base_model.encoder.compute_position_bias(hidden)
            out = layer(hidden, additive(mask), bias)[0]
        else:
            out = layer(hidden, additive(mask))
    return out * mask[..., None]


def assert_rows_alone_and_every_mask_form(layer_class, family) -> None:
    """Each row of a padded call is what it is alone; a BERT layer reads every mask form it is handed (additive,
    SDPA's boolean, 2-D, or none) alike."""
    model = MODELS[family]()
    layer = layer_class.from_layer(model.base_model.encoder.layer[0], model.config, int8=False)
    hidden, mask = padded_input(seed=3)
    batched = run(layer, model, hidden, mask)
    for row in range(len(hidden)):
        length = int(mask[row].sum())
        alone = run(layer, model, hidden[row : row + 1, :length], mask[row : row + 1, :length])
        torch.testing.assert_close(batched[row, :length], alone[0], rtol=1e-4, atol=1e-5)
    if family == "bert":
        with torch.no_grad():
            forms = [layer(hidden, form) * mask[..., None] for form in (mask[:, None, None, :], mask)]
            full = torch.ones_like(mask)
            torch.testing.assert_close(layer(hidden, None), layer(hidden, additive(full)), rtol=0, atol=0)
        for got in forms:
            torch.testing.assert_close(got, batched, rtol=0, atol=0)


def assert_padding_never_read(layer_class, family, int8) -> None:
    """The layer runs on the real tokens only: what the padded positions hold changes nothing, not even the int8
    quantization step of the call, and they come back as zeros."""
    model = MODELS[family]()
    layer = layer_class.from_layer(model.base_model.encoder.layer[0], model.config, int8=int8)
    hidden, mask = padded_input(n=6, length=12, seed=4)
    garbage = torch.where(mask[..., None], hidden, torch.full_like(hidden, 1e4))
    clean, noisy = run(layer, model, hidden, mask), run(layer, model, garbage, mask)
    torch.testing.assert_close(noisy, clean, rtol=0, atol=0)
    with torch.no_grad():
        out = layer(hidden, additive(mask), model.base_model.encoder.compute_position_bias(hidden)) if family == "mpnet" else layer(hidden, additive(mask))  # fmt: skip
    out = out[0] if isinstance(out, tuple) else out
    assert not out[~mask].any()


def assert_copies_rebuild(layer_class, runtime: str):
    """A copy or a pickle of the layer builds its own runtime object (``runtime``: the attribute holding it) and
    gives the same outputs; a new thread count makes a new one. Returns the layer, its thread count changed."""
    model = tiny_model("bert", num_layers=1)
    layer = layer_class.from_layer(model.base_model.encoder.layer[0], model.config)
    hidden, mask = padded_input()
    expected = run(layer, model, hidden, mask)
    first = getattr(layer, runtime)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert getattr(other, runtime) is None
        torch.testing.assert_close(run(other, model, hidden, mask), expected, rtol=0, atol=0)
        assert getattr(other, runtime) is not first and getattr(layer, runtime) is first
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        torch.testing.assert_close(run(layer, model, hidden, mask), expected, rtol=0, atol=0)
        assert getattr(layer, runtime) is not first and layer._threads == torch.get_num_threads()
        return layer, torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


def assert_float_layer_is_the_layer(layer_class, family) -> None:
    """The runtime's float32 layer gives each of a tiny ``family`` model's layers' outputs, up to float32 rounding
    of the same products summed in another order."""
    model = MODELS[family]()
    hidden, mask = padded_input()
    for layer in model.base_model.encoder.layer:
        expected = run(layer, model, hidden, mask)
        got = run(layer_class.from_layer(layer, model.config, int8=False), model, hidden, mask)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def int8_layer_errors(layer_class, family):
    """For each layer of a tiny ``family`` model, the runtime's int8 layer against the ``per-token`` recipe's (the
    same quantization on PyTorch's kernels), as norms: ``(kernel_difference, int8_error, output, from_float)`` (the
    runtime's layer from the per-token one's, the per-token one's from the float layer, the float layer's output,
    the runtime's from the float layer)."""
    from earlyexit_kernels.engine.layers.precision import int8_encoder

    model = MODELS[family]()
    reference = int8_encoder(model, "per-token")
    hidden, mask = padded_input(n=8, length=16, seed=2)
    for layer, per_token in zip(model.base_model.encoder.layer, reference.base_model.encoder.layer):
        exact = run(layer, model, hidden, mask)
        expected = run(per_token, reference, hidden, mask)
        got = run(layer_class.from_layer(layer, model.config), model, hidden, mask)
        norm = lambda x: float(x.norm())  # noqa: E731
        yield norm(got - expected), norm(expected - exact), norm(exact), norm(got - exact)


def recipe_logits(recipe: str, layer_class):
    """A tiny model with MLP heads put on the int8 ``recipe`` whose encoder layers are ``layer_class``'s: every
    layer's logits ``(got, per_token, exact)`` (the recipe's, the ``per-token`` recipe's on PyTorch's kernels, the
    float model's), once the recipe is checked to run every encoder layer and leave the heads as they were."""
    from conftest import mlp_head_model, tiny_batch

    from earlyexit_kernels.engine.layers.precision import int8_encoder, to_base

    model = mlp_head_model(seed=5)
    heads_before = copy.deepcopy(model.early_exit_heads.state_dict())
    ids, mask, types = tiny_batch(6, 12)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, return_all_exits=True)
    with torch.no_grad():
        exact = model(**inputs).all_logits
        per_token = int8_encoder(model, "per-token")(**inputs).all_logits
    to_base(model, "int8", "cpu", int8_recipe=recipe)
    assert model.eek_int8_recipe == recipe
    assert all(isinstance(layer, layer_class) for layer in model.bert.encoder.layer)
    assert all(torch.equal(v, heads_before[k]) for k, v in model.early_exit_heads.state_dict().items())
    with torch.no_grad():
        got = model(**inputs).all_logits
    return got, per_token, exact
