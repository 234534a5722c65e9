"""A packed layer call padded to few shapes (``engine/layers/packed_call_shapes.py``): the real tokens keep their
place and their outputs, the added ones attend only to each other, and a stream of varied calls falls on few
shapes. The reference beside the padding is the same graph run at the call's own shape (ONNX Runtime here,
which has no per-shape preparation to hide a difference; OpenVINO's layer in ``test_ov_layer.py``)."""

import numpy as np
import pytest
from layer_calls import MODELS, padded_input

from earlyexit_kernels.engine.layers.ort_layer import OrtLayer, _mask_tables, ort_available
from earlyexit_kernels.engine.layers.packed_call_shapes import LENGTH_STEP, TOKEN_STEP, padded_call


def feeds_of(n, length, hidden=32, seed=0, bias_rows=None, heads=4):
    """The graph's inputs for a padded call of ``n`` rows (``layer_calls.padded_input``)."""
    states, mask = padded_input(n, length, hidden, seed=seed)
    key_mask, positions = _mask_tables(mask, n, length)
    feeds = {"tokens": states.reshape(n * length, hidden)[positions].numpy(), "positions": positions.numpy(),
             "key_mask": key_mask}  # fmt: skip
    if bias_rows is not None:
        feeds["position_bias"] = np.random.default_rng(seed).standard_normal((bias_rows, heads, length, length))
    return feeds


@pytest.mark.parametrize("n, length", [(1, 3), (5, 11), (7, 16), (3, 40), (40, 9)])
def test_real_tokens_keep_their_row_and_column_and_added_ones_fill_rows_after_them(n, length):
    feeds = feeds_of(n, length, bias_rows=1)
    padded = padded_call(feeds)
    count, rows, new_length = len(feeds["tokens"]), *padded["key_mask"].shape
    assert len(padded["tokens"]) % TOKEN_STEP == 0 and 0 <= len(padded["tokens"]) - count < TOKEN_STEP
    assert new_length % LENGTH_STEP == 0 and 0 <= new_length - length < LENGTH_STEP
    assert rows == n + -(-(len(padded["tokens"]) - count) // new_length)  # just the rows the added tokens need
    np.testing.assert_array_equal(padded["tokens"][:count], feeds["tokens"])
    assert not padded["tokens"][count:].any()
    np.testing.assert_array_equal(
        np.divmod(padded["positions"][:count], new_length), np.divmod(feeds["positions"], length)
    )
    assert (padded["positions"][count:] >= n * new_length).all()  # no real row holds an added token
    np.testing.assert_array_equal(np.flatnonzero(padded["key_mask"]), np.sort(padded["positions"]))
    np.testing.assert_array_equal(padded["position_bias"][:, :, :length, :length], feeds["position_bias"])


@pytest.mark.skipif(not ort_available(), reason="onnxruntime is not installed")
@pytest.mark.parametrize("family", ["bert", "mpnet"])
@pytest.mark.parametrize("int8", [False, True])
def test_the_graph_gives_each_real_token_the_same_output_at_the_padded_shape(family, int8):
    model = MODELS[family]()
    layer = OrtLayer.from_layer(model.base_model.encoder.layer[0], model.config, int8=int8)
    heads = model.config.num_attention_heads
    for n, length in ((1, 3), (5, 11), (9, 20)):
        states, mask = padded_input(n, length, seed=n)
        feeds = feeds_of(n, length, bias_rows=1 if family == "mpnet" else None, heads=heads, seed=n)
        if family == "mpnet":
            feeds["position_bias"] = model.base_model.encoder.compute_position_bias(states).detach().numpy()
        count = len(feeds["tokens"])
        own, padded = layer.run_tokens(feeds), layer.run_tokens(padded_call(feeds))[:count]
        # float rounding at most, from kernels chosen for other sizes (the int8 step of the call is the same: a zero
        # token adds nothing to its range); measured: 0, bit for bit, on these layers
        assert float(np.linalg.norm(own - padded)) < 1e-5 * float(np.linalg.norm(own))


def test_a_stream_of_varied_calls_falls_on_few_token_counts():
    """The runtime prepares each operation per shape of its own inputs, and the token-wise parts, which see the
    token count, take most of the time: over 300 calls of 1..32 rows of up to 16..64 tokens the count takes few
    values."""
    rng = np.random.default_rng(0)
    own, padded = set(), set()
    for _ in range(300):
        n, length = int(rng.integers(1, 33)), int(rng.integers(16, 65))
        feeds = feeds_of(n, length, hidden=1, seed=int(rng.integers(1 << 30)))
        own.add(len(feeds["tokens"]))
        padded.add(len(padded_call(feeds)["tokens"]))
    # measured: 35 token counts of 249
    assert len(padded) < len(own) / 3, (len(padded), len(own))


def test_a_call_on_the_steps_already_is_handed_back_as_it_is():
    feeds = feeds_of(4, 16)
    feeds = {**feeds, "tokens": np.zeros((32, 32), np.float32), "positions": np.arange(32)}
    assert padded_call(feeds) is feeds
