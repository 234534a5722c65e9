"""An encoder layer run by ONNX Runtime: one ONNX graph per layer, its Linear layers int8 per token.

    layer = OrtLayer.from_layer(model.base_model.encoder.layer[i], model.config)
    out = layer(hidden, attention_mask)        # what the layer returns, from ONNX Runtime's CPU kernels

Why: PyTorch's int8 Linear (fbgemm, :class:`~earlyexit_kernels.engine.layers.int8_linear.PerTokenInt8Linear`)
runs a MiniLM-L6 layer about as fast as ONNX Runtime runs it in float32, and this graph's int8
layer 2.3-2.4x faster (MPNet-base: 1.7-1.9x; ``benchmarks/results/amd_epyc/ort_layer_cpu.md``). Serving int8 against a server on ONNX
Runtime (Infinity) needs that layer behind our scheduler, with the exit heads in between: so each
layer is its own graph, called with the rows the scheduler put in the call.

The graph is the layer's arithmetic with the same quantization as ``PerTokenInt8Linear``: every
Linear layer of the layer int8 with one weight scale per output channel (symmetric, ``max |w| /
127``) and one activation scale per token, done the same way: each token's row divided by its
largest magnitude, then ONNX Runtime's ``DynamicQuantizeMatMul`` (one scale for the call, now the
same step for every row), the output multiplied back. The query, key and value projections run as
one product; the attention is ``MultiHeadAttention`` with the padding as a key mask (and MPNet's
relative position bias); GELU is ONNX Runtime's, the norms elementary operations. The graph runs on
the call's real tokens (packed): the padding is never read, and comes back as zeros (served, MiniLM-L6
int8: 1.22x the texts/s of the same graph on every padded position at concurrency 32, 1.05x at 8). Where the CPU lacks VNNI the
weights take 7 bits, as ONNX Runtime's quantizer advises there (``reduce_range``), and so do
``PerTokenInt8Linear``'s: one form per CPU (:mod:`earlyexit_kernels.engine.layers.int8_isa`). A graph made
with 8-bit weights and run where they would saturate (made on another CPU, then shipped) is kept
exact by ONNX Runtime's own transformer (``session.x64quantprecision``, on where the form has 7 bits). With
``int8=False`` the graph is the float32 layer (equal to it up to float rounding: the tests' check
of the graph itself).

Families: BERT-style layers (``attention.self.query/key/value``, ``attention.output``,
``intermediate``, ``output``) and MPNet's (``attention.attn.q/k/v/o``), with exact GELU.
Needs ``onnxruntime`` and ``onnx`` (the ``int8`` extra: ``pip install --no-build-isolation '.[int8]'`` from the
repository).
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from earlyexit_kernels.engine.layers.int8_isa import int8_weight_bits

__all__ = [
    "LayerParts",
    "OrtLayer",
    "PackedGraphLayer",
    "layer_graph",
    "layer_parts",
    "ort_available",
    "shared_cpu_arena",
    "session_options",
    "request_arena_shrink",
    "encoder_layers",
    "run_on_ort",
    "ORT_MISSING",
]

ORT_MISSING = "onnxruntime and onnx are not installed (pip install 'onnxruntime>=1.17' 'onnx>=1.15': the int8 extra)"
#: the fusions the sessions leave out: ONNX Runtime's layer norm kernels are slower than the operations (_Graph.norm)
_UNFUSED = ["LayerNormFusion", "SimplifiedLayerNormFusion", "SkipLayerNormFusion"]
#: the activations the graph runs exactly as the layer does (the erf GELU)
_EXACT_GELU = ("gelu",)


_arena_lock = threading.Lock()
_arena: bool | None = None  # whether this process's shared CPU arena is registered (None: not tried yet)
#: how the shared arena grows (``OrtArenaCfg``'s ``arena_extend_strategy``): 0, a region twice the last one or the
#: next power of two a call asks for. Grown by exactly what a call asked (1), regions of every size piled up that
#: calls of other shapes could not reuse: a served float32 MiniLM-L6 at concurrency 32 sawed between 801 and
#: 881 MiB as the memory trim's shrinks handed them back, where the regions doubling held it at 751-754 MiB
#: (``benchmarks/results/amd_epyc/memory_soak_cpu/minilm_float32_arena_ab.json``; docs/serving.md, "What a server
#: keeps"). A call larger than any before still grows it; the shrink hands that back (:func:`request_arena_shrink`).
ARENA_EXTEND_STRATEGY = 0


def shared_cpu_arena() -> bool:
    """Register one ONNX Runtime CPU arena for every session of this process (grown as
    :data:`ARENA_EXTEND_STRATEGY` says), once; whether the sessions can use it. Where the environment refuses it
    (another library of the process registered its own), each session keeps its own arena."""
    global _arena
    with _arena_lock:
        if _arena is None:
            import onnxruntime as ort

            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            config = ort.OrtArenaCfg({"arena_extend_strategy": ARENA_EXTEND_STRATEGY})
            try:
                ort.create_and_register_allocator(memory, config)
                _arena = True
            except Exception:  # noqa: BLE001 -- ONNX Runtime's own error type: an allocator is registered already
                _arena = False
        return _arena


# Bumped by request_arena_shrink; the first layer call that sees it newer than _shrunk shrinks.
_shrink_generation = 0
_shrunk = 0


def request_arena_shrink() -> None:
    """Ask the next layer call to hand the arena's idle regions back to the system when it ends
    (ONNX Runtime's ``memory.enable_memory_arena_shrinkage``). The arena keeps the largest call's
    need otherwise: one call of 64 x 256 tokens grew a served int8 MiniLM-L6 from 545 to 1,096 MiB,
    which a small call with shrinkage brought back to 545 MiB (``benchmarks/profiles/arena_shrink_cost.py``,
    ``benchmarks/results/amd_epyc/arena_shrink_cost_cpu.txt``).
    ``eek serve``'s memory trim asks for it where resident memory grew since the last shrink, read every 10 s
    (:class:`~earlyexit_kernels.integrations.server.memory_trim.ArenaShrinkRule`).
    One call shrinks, not every layer's: the sessions share one arena (:func:`shared_cpu_arena`), and
    each shrink makes the calls after it extend the arena again, page by page."""
    global _shrink_generation
    _shrink_generation += 1


def _run_options() -> object | None:
    """The run options of a layer's call: shrinkage where asked since the last shrink, else None."""
    global _shrunk
    generation = _shrink_generation
    if _shrunk == generation:
        return None
    import onnxruntime as ort

    _shrunk = generation
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def session_options(threads: int, *, shared_memory: bool = True):
    """The options of a layer's session on ``threads`` threads. ``shared_memory``: its memory from the process's one
    arena (:func:`shared_cpu_arena`), with no memory pattern per input shape; else an arena of its own, extended to
    the next power of two, and a pattern per shape (ONNX Runtime's defaults)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # between layers torch's ops run: ONNX Runtime's threads must not spin waiting for the next call
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if int8_weight_bits() == 7:
        # Without VNNI, s8 weights outside [-64, 64] (a graph made on a VNNI CPU) become u8 for an exact kernel,
        # where the u8s8 one's 16-bit pair sums would saturate; 7-bit weights, the form made here, are left as they
        # are. Not on the vnni class: there it moved 8-bit weights to the u8 kernel too, at half the speed (an int8
        # MiniLM-L6 layer on 8 rows: 12.7 ms against 6.5, benchmarks/micro/ort_exact_kernel.py, Intel Xeon with AMX).
        options.add_session_config_entry("session.x64quantprecision", "1")
    if shared_memory:
        # Memory that stays flat under traffic of every shape (issue 79; docs/serving.md, "What a server keeps"):
        # each session's own arena, holding a memory pattern per input shape, grew a served int8 MiniLM-L6 by
        # 70 MiB over a 300 s soak; one arena for every layer, with no patterns, held it flat and 150 MiB lower.
        options.enable_mem_pattern = False
        if shared_cpu_arena():
            options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """``model``'s encoder layers (``base_model.encoder.layer``), or None where it has no such list."""
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def run_on_ort(model: nn.Module, *, int8: bool) -> None:
    """Each encoder layer of ``model`` (which has the list: :func:`encoder_layers`) its ONNX Runtime graph, in
    place: int8 per token x per channel, or float32; a layer that is one already is kept."""
    OrtLayer.run_encoder_on(model, int8=int8)


def ort_available() -> bool:
    """Whether ONNX Runtime and the ``onnx`` package (which builds the graphs) are importable."""
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


@dataclass
class LayerParts:
    """A layer's weights as the graph reads them (float32 tensors; ``*_weight`` as ``nn.Linear`` holds them)."""

    heads: int
    qkv_weight: torch.Tensor  # [3H, H]: query, key, value
    qkv_bias: torch.Tensor
    out_weight: torch.Tensor
    out_bias: torch.Tensor
    norm1: nn.LayerNorm
    up_weight: torch.Tensor
    up_bias: torch.Tensor
    down_weight: torch.Tensor
    down_bias: torch.Tensor
    norm2: nn.LayerNorm
    position_bias: bool  # MPNet: the relative position bias added to the scores, an input of the layer


def layer_parts(layer: nn.Module, config) -> LayerParts:
    """The weights of a BERT-style or MPNet layer; a ``ValueError`` saying what runs instead otherwise."""
    act = getattr(config, "hidden_act", None)
    if act not in _EXACT_GELU:
        raise ValueError(
            f"the ONNX Runtime layer runs the erf GELU; {config.model_type}'s layers use {act!r}. Run the "
            "per-token int8 recipe (PyTorch's kernels) instead"
        )
    attention = getattr(layer, "attention", None)
    mpnet = hasattr(attention, "attn")
    if mpnet:
        attn = attention.attn
        query, key, value, out, norm1 = attn.q, attn.k, attn.v, attn.o, attention.LayerNorm
        heads = attn.num_attention_heads
    elif hasattr(getattr(attention, "self", None), "query"):
        attn = attention.self
        query, key, value = attn.query, attn.key, attn.value
        out, norm1 = attention.output.dense, attention.output.LayerNorm
        heads = attn.num_attention_heads
        if getattr(attn, "position_embedding_type", "absolute") != "absolute" or getattr(
            layer, "add_cross_attention", 0
        ):
            raise ValueError("the ONNX Runtime layer runs absolute-position self-attention only")
    else:
        raise ValueError(
            f"the ONNX Runtime layer runs BERT-style and MPNet layers; {type(layer).__name__} is neither. Run the "
            "per-token int8 recipe (PyTorch's kernels) instead"
        )
    linears = (query, key, value, out, layer.intermediate.dense, layer.output.dense)
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        raise ValueError("the ONNX Runtime layer reads float nn.Linear layers with a bias (a layer not quantized yet)")

    def weights(*modules):
        return [m.weight.detach().float().cpu() for m in modules], [m.bias.detach().float().cpu() for m in modules]

    (qw, kw, vw), (qb, kb, vb) = weights(query, key, value)
    return LayerParts(
        heads=heads,
        qkv_weight=torch.cat([qw, kw, vw]),
        qkv_bias=torch.cat([qb, kb, vb]),
        out_weight=out.weight.detach().float().cpu(),
        out_bias=out.bias.detach().float().cpu(),
        norm1=norm1,
        up_weight=layer.intermediate.dense.weight.detach().float().cpu(),
        up_bias=layer.intermediate.dense.bias.detach().float().cpu(),
        down_weight=layer.output.dense.weight.detach().float().cpu(),
        down_bias=layer.output.dense.bias.detach().float().cpu(),
        norm2=layer.output.LayerNorm,
        position_bias=mpnet,
    )


class _Graph:
    """The nodes and initializers of one graph as it is built."""

    def __init__(self):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers = [], []

    def const(self, name: str, array) -> str:
        array = array.numpy() if isinstance(array, torch.Tensor) else array
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str | None = None, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def linear(self, x: str, name: str, weight: torch.Tensor, *, int8: bool, weight_max: int) -> str:
        """``x W^T`` (no bias: it is added where the graph fuses it), int8 per token x per channel."""
        w = weight.numpy().T  # [in, out]
        if not int8:
            return self.node("MatMul", [x, self.const(f"{name}.w", w)], f"{name}.y")
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / weight_max
        quantized = np.clip(np.round(w / scale), -weight_max, weight_max).astype(np.int8)
        magnitude = self.node(
            "ReduceMax", [self.node("Abs", [x], f"{name}.abs"), self.const(f"{name}.axes", np.array([-1]))],
            f"{name}.max", keepdims=1,
        )  # fmt: skip
        magnitude = self.node("Max", [magnitude, self.const(f"{name}.eps", np.array(1e-12, np.float32))], f"{name}.m")
        rows = self.node("Div", [x, magnitude], f"{name}.rows")  # every row spans [-1, 1]: one step fits all
        product = self.node(
            "DynamicQuantizeMatMul",
            [
                rows,
                self.const(f"{name}.wq", quantized),
                self.const(f"{name}.ws", scale.astype(np.float32)),
                self.const(f"{name}.wz", np.zeros(w.shape[1], np.int8)),
            ],
            f"{name}.q",
            domain="com.microsoft",
        )
        return self.node("Mul", [product, magnitude], f"{name}.y")

    def norm(self, name: str, x: str, bias: torch.Tensor, residual: str, module: nn.LayerNorm) -> str:
        """``LayerNorm(x + bias + residual)`` in elementary operations, the session keeping them unfused: on the
        graph's first, padded form ([n, S, H]) ONNX Runtime's own LayerNormalization kernel took 520 us on
        [8, 40, 384] on this project's CPU, these 110. On the packed [T, H] the graph now has, the kernel
        is as fast (68 us on [320, 384] against these 126, ``benchmarks/micro/ort_layer.py --norms``) and
        the whole layer times the same either way (a scratch comparison); the operations stayed."""
        summed = self.node(
            "Add", [self.node("Add", [x, self.const(f"{name}.b", bias)], f"{name}.z"), residual], f"{name}.zz"
        )
        axes = self.const(f"{name}.axes", np.array([-1]))
        centred = self.node(
            "Sub", [summed, self.node("ReduceMean", [summed, axes], f"{name}.mean", keepdims=1)], f"{name}.c"
        )
        variance = self.node(
            "ReduceMean", [self.node("Mul", [centred, centred], f"{name}.sq"), axes], f"{name}.var", keepdims=1
        )
        deviation = self.node(
            "Sqrt",
            [self.node("Add", [variance, self.const(f"{name}.eps", np.array(module.eps, np.float32))], f"{name}.ve")],
            f"{name}.sd",
        )
        normed = self.node("Div", [centred, deviation], f"{name}.n")
        scaled = self.node("Mul", [normed, self.const(f"{name}.g", module.weight.detach().float())], f"{name}.ng")
        return self.node("Add", [scaled, self.const(f"{name}.beta", module.bias.detach().float())], name)  # fmt: skip


def layer_graph(parts: LayerParts, *, int8: bool = True, reduce_range: bool | None = None) -> bytes:
    """The serialized ONNX model of the layer on its real tokens: inputs ``tokens`` [T, H] float32 (the
    tokens of the rows, row by row), ``positions`` [T] int64 (each token's flat position in the padded
    grid [n * S]), ``key_mask`` [n, S] int32 (1 for a token, 0 for padding) and, for MPNet,
    ``position_bias`` [n or 1, heads, S, S]; output ``output`` [T, H].

    Every token-wise part (the projections, the feed-forward, the norms) runs on the T tokens; only the
    query, key and value projections are scattered onto the padded grid for the attention, whose
    output is gathered back: a call of rows of unequal length pays for its tokens, not its padding,
    and no row's quantization step depends on another row's padding."""
    from onnx import TensorProto, checker, helper

    reduce_range = int8_weight_bits() == 7 if reduce_range is None else reduce_range
    weight_max = 63 if reduce_range else 127
    hidden_size = parts.qkv_weight.shape[1]
    g = _Graph()
    qkv = g.linear("tokens", "qkv", parts.qkv_weight, int8=int8, weight_max=weight_max)  # [T, 3H]
    width = g.const("qkv.width", np.array([3 * hidden_size]))
    grid_shape = g.node("Shape", ["key_mask"], "grid.shape")  # [n, S]
    slots = g.node("Reshape", [g.node("Size", ["key_mask"], "grid.size"), g.const("one", np.array([1]))], "grid.slots")
    zeros = g.node("ConstantOfShape", [g.node("Concat", [slots, width], "grid.flat", axis=0)], "grid.zeros",
                   value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))  # fmt: skip
    index = g.node("Unsqueeze", ["positions", g.const("last", np.array([-1]))], "grid.index")  # [T, 1]
    grid = g.node("ScatterND", [zeros, index, qkv], "grid")  # [n * S, 3H], zeros at the padding
    grid = g.node("Reshape", [grid, g.node("Concat", [grid_shape, width], "grid.shape3", axis=0)], "grid.rows")
    g.nodes.append(
        helper.make_node(
            "Split",
            [grid, g.const("qkv.split", np.array([hidden_size] * 3))],
            ["q", "k", "v"],
            name="qkv.split",
            axis=-1,
        )
    )
    attention_inputs = ["q", "k", "v", g.const("qkv.b", parts.qkv_bias), "key_mask"]
    if parts.position_bias:
        attention_inputs.append("position_bias")
    context = g.node("MultiHeadAttention", attention_inputs, "context", domain="com.microsoft", num_heads=parts.heads)
    context = g.node("Reshape", [context, g.const("context.flat", np.array([-1, hidden_size]))], "context.grid")
    context = g.node("Gather", [context, "positions"], "context.tokens", axis=0)  # [T, H]
    attended = g.norm("norm1", g.linear(context, "out", parts.out_weight, int8=int8, weight_max=weight_max),
                      parts.out_bias, "tokens", parts.norm1)  # fmt: skip
    up = g.linear(attended, "up", parts.up_weight, int8=int8, weight_max=weight_max)
    gelu = g.node("BiasGelu", [up, g.const("up.b", parts.up_bias)], "gelu", domain="com.microsoft")
    down = g.linear(gelu, "down", parts.down_weight, int8=int8, weight_max=weight_max)
    g.norm("output", down, parts.down_bias, attended, parts.norm2)
    inputs = [
        helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["t", hidden_size]),
        helper.make_tensor_value_info("positions", TensorProto.INT64, ["t"]),
        helper.make_tensor_value_info("key_mask", TensorProto.INT32, ["n", "s"]),
    ]
    if parts.position_bias:
        inputs.append(
            helper.make_tensor_value_info("position_bias", TensorProto.FLOAT, ["bias_rows", parts.heads, "s", "s"])
        )
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["t", hidden_size])
    model = helper.make_model(
        helper.make_graph(g.nodes, "encoder_layer", inputs, [output], g.initializers),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
    )
    checker.check_model(model)
    return model.SerializeToString()


def _key_mask(attention_mask: torch.Tensor | None, n: int, length: int) -> np.ndarray:
    """The [n, S] int32 key mask from the mask a layer takes: None, 2-D, or the 4-D boolean (SDPA: True
    attends) or additive (0 attends) mask, whose first query row holds the padding."""
    if attention_mask is None:
        return np.ones((n, length), np.int32)
    mask = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0, 0, :]
    if mask.dtype != torch.bool:
        mask = mask == 0 if mask.is_floating_point() else mask != 0
    return mask.expand(n, length).to(torch.int32).numpy()


#: the last mask's tables, ``(mask, (n, length, mask's version), key mask, positions)``: a call's layers share one
#: mask tensor (the model's extended mask; the engine keeps its layer mask while a cohort's rows stay the same),
#: so the key mask and the token positions are worked out once for them, not at every layer (a fifth of
#: ``forward``'s own time at concurrency 8 on MiniLM-L6 int8). Keyed by the mask's identity, held here so that no
#: other tensor takes it while cached, and by its version counter, which an in-place write moves.
_last_mask: tuple | None = None


def _mask_tables(attention_mask: torch.Tensor | None, n: int, length: int) -> tuple[np.ndarray, torch.Tensor]:
    """``(key mask [n, S] int32, positions [tokens] int64)`` of a layer's mask (:func:`_key_mask`): the flat
    indices of the tokens attended."""
    global _last_mask
    if attention_mask is not None and attention_mask.is_inference():
        # made under torch.inference_mode: no version counter to tell an in-place write by, so read every time
        key_mask = _key_mask(attention_mask, n, length)
        return key_mask, torch.from_numpy(np.flatnonzero(key_mask))
    cached = _last_mask  # one read: another thread may replace it, never change it
    key = (n, length, None if attention_mask is None else attention_mask._version)
    if cached is not None and cached[0] is attention_mask and cached[1] == key:
        return cached[2], cached[3]
    key_mask = _key_mask(attention_mask, n, length)
    positions = torch.from_numpy(np.flatnonzero(key_mask))
    _last_mask = (attention_mask, key, key_mask, positions)
    return key_mask, positions


def returns_tuple(layer: nn.Module, parts: LayerParts) -> bool:
    """Whether ``layer`` hands back a tuple whose first item is the output (else a tensor), asked with one token."""
    with torch.no_grad():
        return isinstance(layer(torch.zeros(1, 1, parts.qkv_weight.shape[1], dtype=parts.qkv_weight.dtype)), tuple)


def layer_session(graph: bytes, threads: int):
    """ONNX Runtime's session of a layer's ``graph`` (:func:`layer_graph`) on ``threads`` threads."""
    import onnxruntime as ort

    return ort.InferenceSession(
        graph, session_options(threads), providers=["CPUExecutionProvider"], disabled_optimizers=_UNFUSED
    )


def run_session(session, feeds: dict) -> np.ndarray:
    """A layer session's ``output`` [T, H] on ``feeds``."""
    return session.run(None, feeds, _run_options())[0]


class PackedGraphLayer(nn.Module):
    """An encoder layer a runtime runs from its graph on the call's real tokens (:func:`layer_graph`'s inputs),
    called as the layer was: the packing of the call's tokens and the padding's zeros after, once for every
    runtime. A runtime gives :attr:`runtime` (its name, for errors), :meth:`run_tokens` and :meth:`prepare`."""

    runtime = "the runtime"
    position_bias: bool
    returns_tuple: bool

    def run_tokens(self, feeds: dict) -> np.ndarray:
        """The graph's ``output`` [T, H] on ``feeds`` (numpy arrays by input name)."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Make now what the layer's first call would make first (the runtime's session or compiled model, for
        torch's thread count now), so that no call pays for it: a server does so before its first request
        (:func:`~earlyexit_kernels.engine.layers.served_layers.prepare_layers`)."""
        raise NotImplementedError

    def fallback_tokens(self, feeds: dict, error: RuntimeError) -> np.ndarray:
        """What a call gives where :meth:`run_tokens` failed in the runtime with ``error`` (compiling the call's
        shape, its memory): another runtime's output of the same graph, or ``error`` raised (the default)."""
        raise error

    @classmethod
    def run_encoder_on(cls, model: nn.Module, *, int8: bool) -> None:
        """Each encoder layer of ``model`` (which has the list: :func:`encoder_layers`) this runtime's layer, in
        place: int8 per token x per channel, or float32; a layer that is one already is kept."""
        layers = encoder_layers(model)
        for index, layer in enumerate(layers):
            if not isinstance(layer, cls):
                layers[index] = cls.from_layer(layer, model.config, int8=int8)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_bias=None, *args, **kwargs):
        if hidden_states.device.type != "cpu":
            raise ValueError(
                f"the {self.runtime} layer runs on the CPU; the hidden states are on {hidden_states.device}"
            )
        hidden = hidden_states.detach().float()
        n, length, width = hidden.shape
        key_mask, positions = _mask_tables(attention_mask, n, length)
        grid = hidden.reshape(n * length, width)
        padded = len(positions) < n * length
        tokens = grid.index_select(0, positions) if padded else grid.contiguous()  # no padding: the grid's own
        feeds = {"tokens": tokens.numpy(), "positions": positions.numpy(), "key_mask": key_mask}
        if self.position_bias:
            if position_bias is None:
                raise ValueError("this MPNet layer takes the position bias its encoder computes")
            feeds["position_bias"] = position_bias.detach().float().contiguous().numpy()
        try:
            tokens = torch.from_numpy(self.run_tokens(feeds))
        except RuntimeError as error:  # the runtime's own failure, not the call's input (checked above)
            tokens = torch.from_numpy(self.fallback_tokens(feeds, error))
        if padded:  # zeros at the padding, as the engine's packed layer calls leave it
            output = tokens.new_zeros(n * length, width).index_copy_(0, positions, tokens).view(n, length, width)
        else:
            output = tokens.view(n, length, width)
        if hidden_states.dtype != torch.float32:
            output = output.to(hidden_states.dtype)
        return (output,) if self.returns_tuple else output


class OrtLayer(PackedGraphLayer):
    """An encoder layer run by ONNX Runtime from its graph (:func:`layer_graph`), called as the layer was.

    The session is made at the first call, with as many threads as torch has then (made again when
    that changes), and is not copied or pickled: a copy makes its own."""

    runtime = "ONNX Runtime"

    def __init__(self, graph: bytes, *, position_bias: bool, returns_tuple: bool, description: str):
        super().__init__()
        self.graph, self.position_bias, self.returns_tuple = graph, position_bias, returns_tuple
        self.description = description
        self._session = None
        self._threads = None

    @classmethod
    def from_layer(cls, layer: nn.Module, config, *, int8: bool = True, reduce_range: bool | None = None) -> OrtLayer:
        """``layer`` (a float BERT-style or MPNet layer) as a graph; int8 per token x per channel unless not ``int8``."""
        parts = layer_parts(layer, config)
        return cls(
            layer_graph(parts, int8=int8, reduce_range=reduce_range),
            position_bias=parts.position_bias,
            returns_tuple=returns_tuple(layer, parts),
            description="int8 per token x per channel" if int8 else "float32",
        )

    def session(self):
        threads = torch.get_num_threads()
        if self._session is None or self._threads != threads:
            self._session = layer_session(self.graph, threads)
            self._threads = threads
        return self._session

    def run_tokens(self, feeds: dict) -> np.ndarray:
        return run_session(self.session(), feeds)

    def prepare(self) -> None:
        self.session()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_session"] = state["_threads"] = None
        return state

    def __deepcopy__(self, memo):
        copied = OrtLayer(
            self.graph, position_bias=self.position_bias, returns_tuple=self.returns_tuple, description=self.description
        )
        copied.train(self.training)
        return copied

    def extra_repr(self) -> str:
        return f"ONNX Runtime, {self.description}, {len(self.graph) / 2**20:.1f} MiB graph"
