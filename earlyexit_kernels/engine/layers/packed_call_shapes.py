"""A packed layer call padded to a token count from a short list, so that a runtime which prepares each new
shape meets few of them.

OpenVINO's CPU plugin prepares every operation again for each input shape it has not met (shape inference,
and its oneDNN kernels made for the new sizes), then keeps what it made in its runtime cache (keyed by shape).
A server's calls rarely repeat a shape: the token count of each packing, the rows of each batch and the
survivors of each layer change from call to call. On MiniLM-L6's first layer in int8, 200 calls of varied
shape took 24.8 ms per 1,000 tokens the first time and 17.4 the second; padded here, 21.8 and 18.7; ONNX
Runtime, which prepares nothing per shape, 23.2 and 22.4 (``python benchmarks/micro/ov_layer.py --varied 200
--calls``, Intel Xeon with AMX, one run; ``benchmarks/results/intel_xeon/ov_layer_varied_cpu.md``).

The call's inputs are :func:`~earlyexit_kernels.engine.layers.ort_layer.layer_graph`'s: ``tokens`` [T, H], each
token's flat ``positions`` in the padded grid [n * S], the ``key_mask`` [n, S] and MPNet's ``position_bias``
[n or 1, heads, S, S]. Padded:

- T up to a multiple of :data:`TOKEN_STEP`: the token-wise parts (the products, most of the time) see few
  shapes; the added tokens are zeros;
- S up to a multiple of :data:`LENGTH_STEP`; the real tokens keep their row and column;
- n by the rows that hold the added tokens, after the real ones, where they attend to each other (a row of
  no token would attend to nothing).

Buckets of whole rows (1, 2, 3, 4, 6, 8, ...) and of tokens in steps of an eighth cut the shapes further,
but in a scratch comparison on the same calls (not committed) they cost more in padding than they saved.

Each real token's output is unchanged: every token-wise part reads its own row only, the attention of a
real row reads only its own keys (the added rows' keys are not in its row), and the int8 quantization's
range for the call spans 0 already, which a zero token adds nothing to. Up to float rounding: a kernel
chosen for other sizes may sum in another order (the tests bound it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["TOKEN_STEP", "LENGTH_STEP", "ROW_STEP", "padded_call"]

#: the padded token count T is a multiple of this
TOKEN_STEP = 32
#: the padded length S is a multiple of this
LENGTH_STEP = 8
#: the exit graph's rows after a compaction are padded to a multiple of this, as its length is to
#: :data:`LENGTH_STEP`: each new (rows, length) is a shape the plugin prepares again, and a server's calls almost never
#: repeat one unless they are padded to steps. On
#: the Intel Xeon with AMX, MiniLM-L6 RT's static layers at 3.06 of 6 layers (an unlabelled fit) in their exit graph,
#: 1,280 test texts in arrival order in calls of 32, one thread: on shapes it had not met the graph took 3.88 s a pass
#: with rows and length padded to 8, 5.04 s with the length alone padded, 6.95 s with neither; once met, 3.48, 3.20
#: and 2.98 s (``benchmarks/micro/exit_graph_fresh_shapes.py``,
#: ``benchmarks/results/intel_xeon/exit_graph_fresh_shapes_cpu.json``). Few padded shapes are soon all met. The
#: static layers' own calls (the continuous engine's) keep their rows as they come: no committed reading has weighed
#: the padding there.
ROW_STEP = 8


def _up(value: int, step: int) -> int:
    return -(-value // step) * step


def padded_call(feeds: dict) -> dict:
    """``feeds`` (the graph's inputs, numpy arrays by name) padded (the module docstring); the
    real tokens stay the first T of ``tokens``, so the output's first T rows are theirs."""
    tokens, positions, key_mask = feeds["tokens"], feeds["positions"], feeds["key_mask"]
    count, (rows, length) = len(tokens), key_mask.shape
    new_length, new_count = _up(length, LENGTH_STEP), _up(count, TOKEN_STEP)
    added = new_count - count
    if not added and new_length == length:
        return feeds  # on the steps already: nothing to copy
    new_rows = rows + -(-added // new_length)
    row, column = np.divmod(positions, length)
    padded = {
        "tokens": np.zeros((new_count, tokens.shape[1]), tokens.dtype),
        "positions": np.empty(new_count, positions.dtype),
        "key_mask": np.zeros((new_rows, new_length), key_mask.dtype),
    }
    padded["tokens"][:count] = tokens
    padded["positions"][:count] = row * new_length + column
    padded["positions"][count:] = rows * new_length + np.arange(added)  # the rows after the real ones, in order
    padded["key_mask"][:rows, :length] = key_mask
    padded["key_mask"].reshape(-1)[padded["positions"][count:]] = 1
    if "position_bias" in feeds:
        bias = feeds["position_bias"]
        bias_rows = 1 if bias.shape[0] == 1 else new_rows
        padded["position_bias"] = np.zeros((bias_rows, bias.shape[1], new_length, new_length), bias.dtype)
        padded["position_bias"][: bias.shape[0], :, :length, :length] = bias
    return padded
