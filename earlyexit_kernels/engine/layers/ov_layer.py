"""An encoder layer run by OpenVINO: the ONNX Runtime layer's graph, int8 per token on OpenVINO's kernels.

    layer = OvLayer.from_layer(model.base_model.encoder.layer[i], model.config)
    out = layer(hidden, attention_mask)        # what the layer returns, from OpenVINO's CPU plugin

Why: the int8 layer of :class:`~earlyexit_kernels.engine.layers.ort_layer.OrtLayer` runs its products on ONNX
Runtime's ``DynamicQuantizeMatMul``; OpenVINO's CPU plugin runs int8 products on oneDNN's brgemm
kernels, AMX where the CPU has it. Whether that is faster, for the same quantization, decides which
runtime the int8 recipe should take (not wired into :mod:`~earlyexit_kernels.engine.layers.precision` yet).

The model: OpenVINO reads the float32 graph of the ONNX Runtime layer
(:func:`~earlyexit_kernels.engine.layers.ort_layer.layer_graph` with ``int8=False``, from the same
:func:`~earlyexit_kernels.engine.layers.ort_layer.layer_parts`): its importer turns ``MultiHeadAttention`` into
``ScaledDotProductAttention``, ``BiasGelu`` into ``Gelu`` and the norms into ``MVN``; packed tokens in,
zeros at the padding out, as the ONNX Runtime layer. For int8 each of the layer's four products
(query-key-value, attention output, feed-forward up and down) is then rewritten in OpenVINO's own
operations (:func:`_int8_product`) as ``PerTokenInt8Linear`` computes it: the weights int8 per output
channel (``max |w| / 127``; 63 without VNNI, below), each token's row divided by its largest magnitude,
and the rows quantized with fbgemm's step and zero point for the call (u8 over the call's range, which
contains 0) by a ``FakeQuantize`` of 256 levels on the integers 0..255; OpenVINO's low-precision
transformations make that a u8 x s8 ``FullyConnected`` (``brgemm_avx512_amx_I8`` on this machine); the
zero point's share (``zero point x the weight's column sums``) is subtracted after it, the row
magnitudes multiplied back.

Speed (``python benchmarks/micro/ov_layer.py --calls 32x54 8x54 64x128``, one thread, alone, Intel Xeon
with AMX; ``benchmarks/results/intel_xeon/ov_layer_cpu.md``): on calls of 32 x 54, 8 x 54 and 64 x 128
padded tokens, MiniLM-L6's first layer int8 took 22.7 / 5.4 / 118 ms here against 32.8 / 7.1 / 202 on ONNX
Runtime (1.45x / 1.32x / 1.71x), an MPNet-base-shaped one 44.6 / 10.0 / 244 against 64.1 / 15.2 / 396
(1.44x / 1.53x / 1.62x). The gain is AMX's: with oneDNN capped to AVX-512 VNNI
(``ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI``, the instructions of the AMD EPYC the other results were measured
on) the same calls gave 0.96-1.36x in a brief run beside another job. A whole model gains less
(docs/benchmarks.md, "minilm-xeon-int8-layers"), and served calls lose (docs/serving.md).

The forms measured before this one was chosen (MiniLM-L6's first layer, 32 rows of 20-40 tokens, 1,002
tokens, a scratch comparison on the same machine):

- this form: 13.3 ms, 0.10 of what int8 moves from the per-token layer (ONNX Runtime's graph: 0.055);
- the same with symmetric rows (a ``FakeQuantize`` of 255 levels on [-1, 1], s8): 15.1 ms, 0.96 of what int8
  moves from the per-token layer and 1.12x its error from float32: a step of 1/127 where fbgemm's is
  (max - min) / 255, about half that on the GELU's output, whose rows have no large negative value;
- the plugin's dynamic quantization of activations (int8 weights as ``Convert``/``Multiply``, compile option
  ``DYNAMIC_QUANTIZATION_GROUP_SIZE``): 17.0 ms. It quantizes the activations s8 symmetrically in groups of
  that many inputs (measured: exactly ``max |x| / 127`` per group); a group of a whole row, per token, needs
  the option equal to each product's inputs, 384 here but 1,536 for the feed-forward's down projection, and
  the option is one for the model. A value larger than the inputs (768 for 384), or ``UINT64_MAX`` (per
  token in OpenVINO's documentation, for its GPU), turns it off on the CPU, as does one that is not a
  multiple of 16 (the plugin's source): the products then run on float activations. Symmetric, so off
  the per-token layer as the previous form;
- ``nncf.compress_weights(INT8_SYM)`` gives the weights levels -128..127 (the per-token layer's are
  -127..127) for the previous form's kernel, and ``nncf.quantize``'s static activation scales are one per
  tensor, not per token: NNCF is not used.

Without VNNI (AVX2, AVX-512 without VNNI: oneDNN capped with ``ONEDNN_MAX_CPU_ISA``) oneDNN's u8 x s8
kernels add pairs of products in saturating 16-bit sums: a MiniLM-shaped random layer with 8-bit weights
moved 13x further from float32 than with 7-bit ones, which gave exactly what the uncapped CPU gives. So the
weights take 7 bits where :mod:`~earlyexit_kernels.engine.layers.int8_isa`'s class is not ``vnni``, as the per-token
layer's and the ONNX Runtime graph's do, and a layer with 8-bit weights is refused there.

The float parts (attention, GELU, norms) run in float32: the CPU plugin's default on a CPU with bfloat16
(AMX, AVX-512 BF16) is bfloat16 (``INFERENCE_PRECISION_HINT``). With ``int8=False`` the model is the float32
layer (equal to it up to float rounding: the tests' check of the model itself).

A call OpenVINO fails (compiling its shape, its memory: a ``RuntimeError`` from the plugin) is answered by ONNX
Runtime's graph of the same layer (:func:`~earlyexit_kernels.engine.layers.ort_layer.layer_graph`, the same
quantization and weight bits), made with the layer where onnxruntime is installed and kept beside the IR (the
int8 weights a second time, as large as the IR's; ``print(layer)`` and an ``OrtLayer``'s give the sizes); the reason is logged once per process
(``earlyexit_kernels.layers``), and the request is not lost.

Needs ``openvino`` and ``onnx``: the package's ``openvino`` extra (with NNCF), which ``make setup`` installs where wheels exist.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from earlyexit_kernels.engine.layers.int8_isa import int8_isa, int8_weight_bits
from earlyexit_kernels.engine.layers.ort_layer import (
    LayerParts,
    PackedGraphLayer,
    layer_graph,
    layer_parts,
    layer_session,
    ort_available,
    returns_tuple,
    run_session,
)
from earlyexit_kernels.engine.layers.packed_call_shapes import padded_call

__all__ = [
    "OvLayer",
    "ov_model",
    "ov_available",
    "compile_config",
    "SNIPPETS_OFF",
    "ov_core",
    "thread_request",
    "run_on_ov",
    "OV_MISSING",
]

OV_MISSING = (
    "openvino and onnx are not installed (pip install 'openvino>=2025.1' 'onnx>=1.15', or the package's openvino "
    "extra from its repository: pip install --no-build-isolation '.[openvino]')"
)
#: the products the layer's graph has: query-key-value, attention output, feed-forward up and down
_PRODUCTS = 4

_core_lock = threading.Lock()
_core = None


logger = logging.getLogger("earlyexit_kernels.layers")
#: the reasons of OpenVINO's failed calls logged so far (each once per process)
_logged_failures: set[str] = set()


def ov_available() -> bool:
    """Whether OpenVINO and the ``onnx`` package (which builds the graph OpenVINO reads) are importable."""
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("onnx") is not None


def run_on_ov(model: nn.Module, *, int8: bool) -> None:
    """Each encoder layer of ``model`` (which has the list: :func:`~earlyexit_kernels.engine.layers.ort_layer.encoder_layers`)
    its OpenVINO model, in place: int8 per token x per channel, or float32; a layer that is one already is kept."""
    OvLayer.run_encoder_on(model, int8=int8)


def ov_core():
    """This process's one ``openvino.Core``."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


def thread_request(requests: threading.local, compiled):
    """This thread's infer request of ``compiled``, kept in ``requests`` (made at the thread's first call, and again
    after a recompilation): a request serves one call at a time."""
    held = getattr(requests, "held", None)
    if held is None or held[0] is not compiled:
        held = requests.held = (compiled, compiled.create_infer_request())
    return held[1]


#: the CPU plugin's option that turns its code generation for fused subgraphs off (its default: on); the exit graph's
#: timed candidate (:data:`~earlyexit_kernels.engine.layers.runtime_choice.EXIT_GRAPH_CANDIDATES`)
SNIPPETS_OFF = ("SNIPPETS_MODE", "DISABLE")


#: entries of the CPU plugin's runtime cache (the operations it prepared for each shape met) a compiled model keeps,
#: or None for the plugin's own default (5,000); read at each compilation. In one process about two thirds of what a
#: pass over new call shapes kept was this cache's (``benchmarks/results/amd_epyc/ov_shape_memory/``), yet held to 1,000
#: entries it left a served soak's growth as it was (``memory_soak_cpu/minilm_static_ov_runtime_cache.json``), so the
#: plugin's default stays; ``benchmarks/profiles/ov_runtime_cache.py`` sets it per server for such soaks.
RUNTIME_CACHE_CAPACITY: int | None = None


def compile_config(threads: int, settings: tuple = ()) -> dict:
    """The CPU plugin's options for a layer on ``threads`` threads, with ``settings`` (pairs of option and value,
    such as the exit graph's, chosen by timing where ``eek fit`` chose them) over them."""
    cache = {} if RUNTIME_CACHE_CAPACITY is None else {"CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_CAPACITY}
    return (
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # float32 where it is not int8: on a CPU with bfloat16 the plugin's default would be bfloat16
            "INFERENCE_PRECISION_HINT": "f32",
            # the quantization is the model's own (_int8_product), not the plugin's of compressed weights
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
            # between layers torch's threads run on the same cores: OpenVINO's are not bound to any
            "ENABLE_CPU_PINNING": False,
        }
        | cache
        | dict(settings)
    )


def _int8_product(product, weight_max: int) -> None:
    """Replace ``product`` (a ``MatMul`` of activations [T, in] by a constant weight) by its int8 form, in place:
    ``PerTokenInt8Linear``'s arithmetic, fbgemm's zero point for the call included, with the u8 x s8 product
    on OpenVINO's int8 kernel."""
    from openvino import Type
    from openvino import opset13 as ops

    def const(value):
        return ops.constant(np.asarray(value, np.float32))

    x = product.input(0).get_source_output()
    weight = product.input(1).get_source_output().get_node().get_data().astype(np.float32)
    if product.get_transpose_a():
        raise ValueError("the layer's products read their activations as they are (a MatMul without transpose_a)")
    weight = weight.T if product.get_transpose_b() else weight  # [in, out]
    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / weight_max
    quantized = np.clip(np.round(weight / scale), -weight_max, weight_max).astype(np.int8)
    column_sums = (quantized.astype(np.float32) * scale).sum(axis=0)  # [out]: each output's sum of weights
    # Constant(i8) -> Convert -> Multiply by the channel scales: the weights form the plugin's int8 kernels read
    weights = ops.multiply(
        ops.convert(ops.constant(np.ascontiguousarray(quantized.T)), Type.f32), const(scale[:, None])
    )  # [out, in]
    last, every = ops.constant(np.array([-1])), ops.constant(np.arange(x.get_partial_shape().rank.get_length()))
    low, high = ops.reduce_min(x, last, True), ops.reduce_max(x, last, True)  # each row's, [T, 1]
    magnitude = ops.maximum(ops.maximum(high, ops.negative(low)), const(1e-12))
    # the call's range of the rows divided by their magnitudes, 0 inside: fbgemm's u8 step and zero point
    low = ops.minimum(ops.reduce_min(ops.divide(low, magnitude), every, False), const(0))
    high = ops.maximum(ops.reduce_max(ops.divide(high, magnitude), every, False), const(0))
    step = ops.maximum(ops.divide(ops.subtract(high, low), const(255)), const(1e-12))
    zero = ops.clamp(ops.round(ops.divide(ops.negative(low), step), "half_to_even"), 0, 255)
    row_step = ops.multiply(step, magnitude)  # [T, 1]: each row's step
    levels = ops.fake_quantize(ops.add(ops.divide(x, row_step), zero), const(0), const(255), const(0), const(255), 256)
    integers = ops.matmul(levels, weights, False, True)  # the u8 x s8 FullyConnected, its channel scales applied
    out = ops.multiply(ops.subtract(integers, ops.multiply(zero, const(column_sums))), row_step)
    product.output(0).replace(out.output(0))


def ov_model(parts: LayerParts, *, int8: bool = True, reduce_range: bool | None = None):
    """The ``openvino.Model`` of the layer on its real tokens, with the inputs and output of
    :func:`~earlyexit_kernels.engine.layers.ort_layer.layer_graph`'s graph; int8 per token x per channel unless not
    ``int8``. ``reduce_range``: 7-bit weights (None: where this CPU's int8 class is not ``vnni``, as the
    per-token layer and the ONNX Runtime graph take them)."""
    import openvino as ov

    model = ov.convert_model(io.BytesIO(layer_graph(parts, int8=False)))
    if int8:
        reduce_range = int8_weight_bits() == 7 if reduce_range is None else reduce_range
        products = [
            op
            for op in model.get_ordered_ops()
            if op.get_type_name() == "MatMul"
            and op.input(1).get_source_output().get_node().get_type_name() == "Constant"
        ]
        if len(products) != _PRODUCTS:
            raise RuntimeError(f"OpenVINO read {len(products)} products of a weight from the layer's graph, not 4")
        for product in products:
            _int8_product(product, 63 if reduce_range else 127)
        model.validate_nodes_and_infer_types()
    return model


def _serialized(model) -> tuple[bytes, bytes]:
    """``model`` as OpenVINO's IR: ``(xml, weights)``, as they are (no float16 compression)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as folder:
        xml, weights = Path(folder, "layer.xml"), Path(folder, "layer.bin")
        ov.serialize(model, str(xml), str(weights))
        return xml.read_bytes(), weights.read_bytes()


class OvLayer(PackedGraphLayer):
    """An encoder layer run by OpenVINO's CPU plugin from its model (:func:`ov_model`), called as the layer was.

    The model is compiled at the first call, with as many threads as torch has then (compiled again when
    that changes); a thread calling it has its own infer request. The compiled model is not copied or
    pickled: a copy compiles its own from the IR it keeps. Each call is padded to a shape from a short list
    (:mod:`~earlyexit_kernels.engine.layers.packed_call_shapes`), since the plugin prepares every new shape again."""

    runtime = "OpenVINO"
    #: what a layer with 8-bit weights refused on a CPU without VNNI is told to do
    remake = "Make the layer again here (OvLayer.from_layer: 7-bit weights)"
    #: what the ONNX Runtime graph a failed call runs on computes, beside this layer
    fallback_form = "the same quantization"

    def __init__(
        self,
        ir: tuple[bytes, bytes],
        *,
        position_bias: bool,
        returns_tuple: bool,
        weight_bits: int | None,
        padded_shapes: bool = True,
        fallback_graph: bytes | None = None,
    ):
        """``weight_bits``: the int8 weights' bits (8, or 7: reduced range), None for the float32 model.
        ``padded_shapes``: each call padded to a multiple of 32 tokens (False: run at its own shape).
        ``fallback_graph``: the ONNX Runtime graph of the same layer (:func:`layer_graph`, the same quantization)
        that runs a call OpenVINO fails (:meth:`fallback_tokens`); None: such a call raises."""
        super().__init__()
        self.ir, self.position_bias, self.returns_tuple = ir, position_bias, returns_tuple
        self.weight_bits, self.padded_shapes = weight_bits, padded_shapes
        self.fallback_graph = fallback_graph
        self._compiled = None
        self._threads = None
        self._requests = threading.local()
        self._fallback = None  # (threads, ONNX Runtime's session of fallback_graph), made at the first failure

    @classmethod
    def from_layer(cls, layer: nn.Module, config, *, int8: bool = True, reduce_range: bool | None = None) -> OvLayer:
        """``layer`` (a float BERT-style or MPNet layer) as an OpenVINO model; int8 per token x per channel unless
        not ``int8``."""
        parts = layer_parts(layer, config)
        reduce_range = int8_weight_bits() == 7 if reduce_range is None else reduce_range
        return cls(
            _serialized(ov_model(parts, int8=int8, reduce_range=reduce_range)),
            position_bias=parts.position_bias,
            returns_tuple=returns_tuple(layer, parts),
            weight_bits=(7 if reduce_range else 8) if int8 else None,
            fallback_graph=layer_graph(parts, int8=int8, reduce_range=reduce_range) if ort_available() else None,
        )

    def compiled(self):
        """The compiled model for torch's thread count now."""
        threads = torch.get_num_threads()
        if self._compiled is None or self._threads != threads:
            if self.weight_bits == 8 and int8_weight_bits() == 7:
                raise ValueError(
                    f"this OpenVINO layer has 8-bit weights, made on a CPU with VNNI; this CPU's int8 class is "
                    f"{int8_isa()}, whose u8 x s8 kernels add pairs of products in saturating 16-bit sums. "
                    f"{self.remake}"
                )
            core = ov_core()
            xml, weights = self.ir
            self._compiled = core.compile_model(core.read_model(xml, weights), "CPU", compile_config(threads))
            self._threads = threads
        return self._compiled

    def prepare(self) -> None:
        self.compiled()  # the infer request is each thread's own, made at its first call (cheap beside this)

    def _request(self):
        return thread_request(self._requests, self.compiled())

    def run_tokens(self, feeds: dict) -> np.ndarray:
        count = len(feeds["tokens"])
        if self.padded_shapes:
            feeds = padded_call(feeds)
        # the inputs read in place (the call waits for the result); the output copied out of the request's memory
        return self._request().infer(feeds, share_inputs=True)[0][:count]

    def fallback_tokens(self, feeds: dict, error: RuntimeError) -> np.ndarray:
        """A call OpenVINO failed (compiling its shape, its memory) run by ONNX Runtime on the same layer's graph,
        the same quantization, so the call is answered; the reason logged once per process. Without the graph
        (onnxruntime missing when the layer was made) the error is raised, saying so."""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if self.fallback_graph is None:
            raise RuntimeError(
                f"OpenVINO failed a layer call of {len(feeds['tokens'])} tokens ({reason}), and the layer has no "
                "ONNX Runtime graph to run it instead (onnxruntime was not installed when it was made)"
            ) from error
        threads = torch.get_num_threads()
        if self._fallback is None or self._fallback[0] != threads:
            self._fallback = (threads, layer_session(self.fallback_graph, threads))
        if reason not in _logged_failures:
            _logged_failures.add(reason)
            logger.warning(
                "OpenVINO failed a layer call of %d tokens (%s): that call ran on ONNX Runtime's layer, %s (logged "
                "once per reason)",
                len(feeds["tokens"]),
                reason,
                self.fallback_form,
            )
        return run_session(self._fallback[1], feeds)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_compiled"] = state["_threads"] = state["_requests"] = state["_fallback"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("padded_shapes", True)  # pickled before calls were padded
        state.setdefault("fallback_graph", None)  # pickled before a failed call fell back
        super().__setstate__(state)
        self._requests = threading.local()
        self._fallback = None

    def __deepcopy__(self, memo):
        copied = OvLayer(
            self.ir,
            position_bias=self.position_bias,
            returns_tuple=self.returns_tuple,
            weight_bits=self.weight_bits,
            padded_shapes=self.padded_shapes,
            fallback_graph=self.fallback_graph,
        )
        copied.train(self.training)
        return copied

    def extra_repr(self) -> str:
        form = (
            "float32" if self.weight_bits is None else f"int8 per token x per channel, {self.weight_bits}-bit weights"
        )
        shapes = "calls padded to 32 tokens" if self.padded_shapes else "each call's own shape"
        return f"OpenVINO, {form}, {len(self.ir[1]) / 2**20:.1f} MiB weights, {shapes}"
