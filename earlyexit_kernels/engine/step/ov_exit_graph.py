"""Early exit in one OpenVINO call: the static int8 layers, each layer's exit head and exit rule, and the batch
compacted between layers, all inside one compiled model.

    graph = exit_graph(model, adapter, heads, policy)  # None where it cannot run this model and policy
    logits, exit_layer, lengths = graph.run(hidden, mask, policy)  # lengths: the grid at each layer

Why: each :class:`~earlyexit_kernels.engine.layers.ov_static.StaticOvLayer` is a compiled model of its own, and
separate compiled models keep their own scratch memory and generated kernels, met cold at each call: on the Intel
Xeon with AMX six compilations of one layer ran 1.12x one compilation called six times on the same inputs
(``benchmarks/results/intel_xeon/ov_compiled_models_cpu.json``). Between the layer calls the host ran the heads,
the rule and the compaction in torch and copied the grid in and out of OpenVINO's memory. Here the six layers share
one compiled model, whose plugin plans their memory together, and the host makes one call a batch: the embeddings
in, each layer's head logits, decisions and row indices out.

How: the layers are the static layers' own IR (the same scales and weights, so the same hidden states), wired one
into the next. After layer ``i < L`` a small torch step (all of them converted by OpenVINO in one trace, then wired
in between the layers) computes what the exact loop computes (:mod:`earlyexit_kernels.engine.step.batch_loop`): the head's input (``adapter.exit_input``), its logits
(``adapter.classify``), the rule of :func:`earlyexit_kernels.methods.exit_rules.exit_step` for entropy and top
probability (a row with a non-finite logit never leaves), then gathers the rows that go on and trims the grid to
the positions they need, as the exact loop trims it (the longest row going on, rounded up to the layers'
:data:`~earlyexit_kernels.engine.layers.packed_call_shapes.LENGTH_STEP`; each row's length is an input, carried with
the rows). The rows gathered are padded up to a multiple of
:data:`~earlyexit_kernels.engine.layers.packed_call_shapes.ROW_STEP` with rows that have left (never past the
rows there are), which the host ignores: the plugin prepares each operation again for every shape it has not met,
and a compacted batch of any row count and length would almost always be one. The thresholds (and temperatures)
are inputs of the graph, so a new policy of the same kind runs on the same compiled model. After layer ``L`` the model's own head. MPNet's layers read the encoder's relative
position bias: it depends on the positions only, so it is one more input, ``[1, heads, S, S]``, that every layer
reads (trimmed with the grid) and that broadcasts over whichever rows are left. The host writes each row's logits
from the first layer whose rule let it leave.

OpenVINO's CPU plugin fails on an empty batch (every later output came back empty, then the process aborted, with
2026.4), so the first row of each layer's survivors always goes on. Where every row has left, that row (its length
set to 0: it has left), with the rows that pad it to ``ROW_STEP``, runs the remaining layers on a grid of one
position, and the host keeps each row's first exit.
Before, it ran them at its full length: a single text (a served call at c1) ran every layer whatever layer it left
at.

Measured (docs/benchmarks.md, "minilm-xeon-static-ov-exit-graph"): on the Intel Xeon with AMX, MiniLM-L6 fine-tuned
on Rotten Tomatoes, one thread, 600 test texts in length-sorted batches of 32, early exit at 2.49 of 6 layers ran
2.00x the same static layers at full depth in two runs (paired; 1.84x layer by layer in the two runs before it), and
1.35x and 1.52x OpenVINO's static int8 model at its faster setting
(``benchmarks/results/intel_xeon/stack_int8_static_ov_exit_graph_cpu``, ``..._run2``).
On a corpus the cohort engine on the graph ran 0.99x the continuous engine's layer calls
(``benchmarks/results/intel_xeon/corpus_peers_exit_graph_cpu.json``), so ``eek classify`` keeps that engine.

Whether the graph runs at all is timed on the user's CPU: ``eek fit`` races it against the layers one call each
(:func:`~earlyexit_kernels.engine.layers.runtime_choice.choose_exit_graph_settings`) and keeps the faster.

The decisions are the exact loop's up to float rounding of the heads (OpenVINO's float32 products against torch's):
a row whose entropy lies within that rounding of its threshold may leave a layer apart. ``eek.patch(...,
step="exact")`` runs the layer-by-layer loop instead.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import warnings
import weakref

import numpy as np
import torch
from torch import nn

from earlyexit_kernels.engine.layers.int8_isa import int8_weight_bits
from earlyexit_kernels.engine.layers.ort_layer import encoder_layers
from earlyexit_kernels.engine.layers.ov_layer import compile_config, ov_core, thread_request
from earlyexit_kernels.engine.layers.ov_static import StaticOvLayer, grid_inputs
from earlyexit_kernels.engine.layers.packed_call_shapes import LENGTH_STEP, ROW_STEP
from earlyexit_kernels.engine.step.batch_loop import ExitResult, mask_extents
from earlyexit_kernels.engine.step.heads import weights_fingerprint
from earlyexit_kernels.methods.policies import Entropy, ExitPolicy, MaxProb, layer_value

__all__ = [
    "GRAPH_MIN_POSITIONS",
    "exit_graph_refusal",
    "ExitGraph",
    "exit_graph",
    "exit_graph_values",
    "run_exit_graph",
    "wired_layer",
]

_log = logging.getLogger(__name__)
#: each model's exit graph with what it was built of (kept apart from the model: a copy of it builds its own)
_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_graphs_lock = threading.Lock()


def exit_graph_refusal(model: nn.Module, adapter, heads, policy: ExitPolicy) -> str | None:
    """Why the exit graph cannot run ``model`` (a patched model) with ``policy``, or None where it can."""
    layers = encoder_layers(model)
    if not layers or not all(isinstance(layer, StaticOvLayer) for layer in layers):
        return "its encoder layers are not static int8 layers on OpenVINO"
    if not all(layer.exit_graph_on for layer in layers):
        return "eek fit timed its layers one call each faster than the exit graph on the CPU it fitted on"
    if int8_weight_bits() == 7 and any(layer.weight_bits == 8 for layer in layers):
        return "its layers' 8-bit weights would saturate this CPU's int8 kernels (the layers say what to do)"
    if type(policy) not in (Entropy, MaxProb):
        return f"{type(policy).__name__} is not a threshold on one head's distribution (Entropy, MaxProb)"
    if heads is None or heads.form not in ("model", "mlp"):
        return "its exit heads read more than their own layer (the cascade form)"
    if any(p.dtype != torch.float32 for p in heads.parameters()):
        return "its exit heads are not float32"
    return None


def exit_graph_values(policy: ExitPolicy, num_layers: int) -> dict[str, np.ndarray]:
    """The graph's policy inputs: per layer (1..L-1) the threshold and, for MaxProb, the temperature."""
    before = range(1, num_layers)
    values = {"thresholds": np.array([layer_value(policy.threshold, i) for i in before], np.float32)}
    if isinstance(policy, MaxProb):
        temperature = policy.temperature
        values["temperatures"] = np.array(
            [1.0 if temperature is None else layer_value(temperature, i) for i in before], np.float32
        )
    return values


class _ExitStep(nn.Module):
    """After layer ``layer`` (1-based, < L): the head's logits, the rule's decisions, and the rows that go on."""

    def __init__(self, adapter, heads: nn.Module, layer: int, kind: str, normalized: bool, steps: tuple[int, int]):
        super().__init__()
        self.adapter, self.heads = adapter, heads  # heads: registered, so the trace reads its weights as constants
        self.layer, self.kind, self.normalized = layer, kind, normalized
        self.length_step, self.row_step = steps

    def forward(self, hidden, key_mask, rows, extents, thresholds, temperatures=None):
        z = self.adapter.classify(self.layer, self.adapter.exit_input(self.layer, hidden, key_mask)).float()
        finite = torch.isfinite(z).all(dim=-1)
        threshold = thresholds[self.layer - 1]
        if self.kind == "entropy":  # exit_rules.entropy, _entropy_exits
            log_p = torch.log_softmax(z, dim=-1)
            h = -(log_p.exp() * log_p).sum(-1)
            if self.normalized:
                h = h / math.log(z.shape[-1])
            exits = finite & (h < threshold)
        else:  # MaxProb
            max_p = torch.softmax(z / temperatures[self.layer - 1], dim=-1).amax(dim=-1)
            exits = finite & (max_p >= threshold)
        # the plugin fails on an empty batch: the first survivor always goes on (the host keeps its first exit);
        # ``extents``: each row's length (its last attended position + 1), 0 for a row that has left (the row kept
        # only for the plugin)
        going_on = (extents > 0) & ~exits
        wanted = going_on | (rows == rows[0])
        keep = torch.nonzero(wanted | _fillers(wanted, self.row_step)).squeeze(-1)
        extents = torch.where(going_on, extents, torch.zeros_like(extents)).index_select(0, keep)
        kept = (hidden.index_select(0, keep), key_mask.index_select(0, keep), rows.index_select(0, keep), extents)
        return z, exits, *kept, _kept_length(extents, self.length_step)


def _fillers(wanted: torch.Tensor, step: int) -> torch.Tensor:
    """[n] bool: the first rows not ``wanted`` that pad the wanted ones up to a multiple of ``step`` rows (never past
    the n there are). They have left (or are rows kept past their exit): their extents go on as 0, their decisions
    are not read (the host keeps each row's first exit)."""
    count = wanted.sum(0, keepdim=True)
    padded = torch.div(count + (step - 1), step, rounding_mode="floor") * step
    return torch.cumsum((~wanted).long(), 0) <= (padded - count)


def _kept_length(extents: torch.Tensor, step: int) -> torch.Tensor:
    """[1] int64: the grid length the rows of ``extents`` need, as the exact loop trims it: the longest rounded up to
    a multiple of ``step`` (the graph's :attr:`ExitGraph.length_step`; :func:`~earlyexit_kernels.engine.step.
    batch_loop.kept_length`; never past the grid, whose length :func:`grid_inputs` rounds up the same way); 1 where
    none goes on (every extent 0), so that the row kept only for the plugin runs the later layers on one position.
    Few operations: each costs the plugin a few microseconds a call whatever its size."""
    longest = extents.amax(0, keepdim=True)
    if step == 1:
        return torch.where(longest > 0, longest, torch.ones_like(longest))
    rounded = torch.div(longest + (step - 1), step, rounding_mode="floor") * step
    return torch.where(longest > 0, rounded, torch.ones_like(longest))


class _FinalHead(nn.Module):
    """After layer ``L``: the model's own head."""

    def __init__(self, adapter, heads: nn.Module, num_layers: int):
        super().__init__()
        self.adapter, self.heads, self.num_layers = adapter, heads, num_layers
        self.classifier = adapter.final_classifier  # registered for the trace, as the heads

    def forward(self, hidden, key_mask):
        return self.adapter.classify(
            self.num_layers, self.adapter.exit_input(self.num_layers, hidden, key_mask)
        ).float()


class _AllSteps(nn.Module):
    """Every layer's step in one module, so that one trace converts them all (each conversion traces anew):
    inputs ``hidden_i, key_mask_i, rows_i, extents_i`` for each layer ``i < L``, ``hidden_L, key_mask_L``, then the
    policy's values; outputs each step's seven, then the final logits."""

    def __init__(self, adapter, heads: nn.Module, num_layers: int, kind: str, normalized: bool, steps: tuple[int, int]):
        super().__init__()
        self.steps = nn.ModuleList(_ExitStep(adapter, heads, i, kind, normalized, steps) for i in range(1, num_layers))
        self.final = _FinalHead(adapter, heads, num_layers)

    def forward(self, *inputs):
        count = len(self.steps)
        values = inputs[4 * count + 2 :]
        outputs = []
        for index, step in enumerate(self.steps):
            outputs += step(*inputs[4 * index : 4 * index + 4], *values)
        outputs.append(self.final(*inputs[4 * count : 4 * count + 2]))
        return tuple(outputs)


def _converted(module: nn.Module, model: nn.Module, example: dict, shapes: list):
    """``module`` converted by OpenVINO, the weights it reads from ``model`` as constants (the tracer refuses a
    constant that requires grad: the flags are off during the trace and set back after)."""
    import openvino as ov

    flagged = [p for p in model.parameters() if p.requires_grad]
    try:
        for parameter in flagged:
            parameter.requires_grad_(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return ov.convert_model(module.eval(), example_input=tuple(example.values()), input=shapes)
    finally:
        for parameter in flagged:
            parameter.requires_grad_(True)


def _prefixed(model, prefix: str):
    """``model`` with every node's and tensor's name prefixed: the parts of one graph must not share a name."""
    for node in model.get_ops():
        node.set_friendly_name(prefix + node.get_friendly_name())
        for output in node.outputs():
            output.get_tensor().set_names({prefix + name for name in output.get_names()})
    return model


def _feed(parameter, source) -> None:
    """Put ``source`` (an output of the graph being built) where ``parameter`` was, converted to its type."""
    from openvino import opset13 as ops

    if parameter.get_element_type() != source.get_element_type():
        source = ops.convert(source, parameter.get_element_type()).output(0)
    parameter.output(0).replace(source)


def _wire(model, prefix: str, sources: dict) -> list:
    """Feed ``model``'s inputs from ``sources`` (by input name) and return its outputs, now part of one graph."""
    for parameter in model.get_parameters():
        (name,) = {n[len(prefix) :] for n in parameter.output(0).get_names()} & set(sources)
        _feed(parameter, sources[name])
    return [result.input_value(0) for result in model.get_results()]


def wired_layer(layer: nn.Module, index: int, sources: dict):
    """Static layer ``index``'s (1-based) IR, its names prefixed ``layer{index}/``, fed from ``sources`` (the graph's
    outputs by input name: ``hidden``, ``key_mask``, MPNet's ``position_bias``): its hidden output, now part of the
    graph being built."""
    prefix = f"layer{index}/"
    (hidden,) = _wire(_prefixed(ov_core().read_model(*layer.ir), prefix), prefix, sources)
    return hidden


def exit_graph_model(
    model: nn.Module,
    adapter,
    heads,
    policy: ExitPolicy,
    length_step: int = LENGTH_STEP,
    row_step: int = ROW_STEP,
    *,
    compact: bool = True,
):
    """The ``openvino.Model`` of the whole early-exit encoder of ``model``: inputs ``hidden`` [n, S, H] (the
    embeddings on a grid padded as the static layers pad it), ``key_mask`` [n, S] int32, ``rows`` [n] int64,
    ``extents`` [n] int64 (each row's length, :func:`~earlyexit_kernels.engine.step.batch_loop.mask_extents`) and the policy's values (:func:`exit_graph_values`);
    outputs, per layer ``i < L``, its rows' logits, decisions and row indices and the next layer's grid length [1],
    then layer ``L``'s logits and rows.

    ``compact=False``: every row runs every layer on the grid it came in on (the heads and decisions still computed,
    each row's first exit still the answer): the same answers without the data-dependent shapes, a form no path runs;
    ``benchmarks/micro/exit_graph_profile.py --without-compaction`` times it to split the exit steps' cost from the
    compaction's."""
    import openvino as ov
    from openvino import opset13 as ops

    layers = encoder_layers(model)
    num_layers, width = len(layers), adapter.hidden_size
    kind = "entropy" if isinstance(policy, Entropy) else "max_prob"
    normalized = bool(getattr(policy, "normalized", False))
    inputs = {
        "hidden": ops.parameter([-1, -1, width], ov.Type.f32, name="hidden"),
        "key_mask": ops.parameter([-1, -1], ov.Type.i32, name="key_mask"),
        "rows": ops.parameter([-1], ov.Type.i64, name="rows"),
        "extents": ops.parameter([-1], ov.Type.i64, name="extents"),
        "thresholds": ops.parameter([num_layers - 1], ov.Type.f32, name="thresholds"),
    }
    if layers[0].position_bias:
        # MPNet's relative position bias: one [1, heads, S, S] for every row (it depends on positions only), so it
        # broadcasts over whichever rows are left, and every layer reads the same
        num_heads = model.config.num_attention_heads  # (``heads`` is the exit heads, traced below)
        inputs["position_bias"] = ops.parameter([1, num_heads, -1, -1], ov.Type.f32, name="position_bias")
    if kind == "max_prob":
        inputs["temperatures"] = ops.parameter([num_layers - 1], ov.Type.f32, name="temperatures")
    for name, parameter in inputs.items():
        parameter.output(0).get_tensor().set_names({name})
    example, shapes = {}, []
    for index in range(1, num_layers + 1):
        example.update(
            {f"hidden_{index}": torch.zeros(2, 8, width), f"key_mask_{index}": torch.ones(2, 8, dtype=torch.int32)}
        )
        shapes += [(f"hidden_{index}", [-1, -1, width]), (f"key_mask_{index}", [-1, -1])]
        if index < num_layers:
            example[f"rows_{index}"] = torch.arange(2)
            example[f"extents_{index}"] = torch.full((2,), 8)
            shapes += [(f"rows_{index}", [-1]), (f"extents_{index}", [-1])]
    example["thresholds"] = torch.zeros(num_layers - 1)
    shapes.append(("thresholds", [num_layers - 1]))
    if kind == "max_prob":
        example["temperatures"] = torch.ones(num_layers - 1)
        shapes.append(("temperatures", [num_layers - 1]))
    # positional inputs (the module takes *inputs): the parameters come in the example's order
    steps = _prefixed(
        _converted(
            _AllSteps(adapter, heads, num_layers, kind, normalized, (length_step, row_step)),
            model,
            example,
            [s for _, s in shapes],
        ),
        "exit/",
    )
    step_inputs = dict(zip(example, steps.get_parameters(), strict=True))
    step_outputs = [result.input_value(0) for result in steps.get_results()]

    def feed(name: str, source) -> None:
        _feed(step_inputs[name], source)

    for name in ("thresholds", "temperatures"):
        if name in step_inputs:
            feed(name, inputs[name].output(0))
    names = ("hidden", "key_mask", "rows", "extents", "position_bias")
    current = {name: inputs[name].output(0) for name in names if name in inputs}
    outputs = []
    for index, layer in enumerate(layers, start=1):
        hidden_out = wired_layer(layer, index, current)
        feed(f"hidden_{index}", hidden_out)
        feed(f"key_mask_{index}", current["key_mask"])
        if index == num_layers:
            outputs += [step_outputs[-1], current["rows"]]
        else:
            feed(f"rows_{index}", current["rows"])
            feed(f"extents_{index}", current["extents"])
            logits, exits, hidden, key_mask, rows, extents, length = step_outputs[7 * (index - 1) : 7 * index]
            if not compact:  # every row goes on, on the same grid: the layer's output feeds the next as it is
                grid = ops.gather(ops.shape_of(current["key_mask"]), np.array([1], np.int64), np.int64(0)).output(0)
                outputs += [logits, exits, current["rows"], grid]
                current = {**current, "hidden": hidden_out}
                continue
            outputs += [logits, exits, current["rows"], length]
            # the next layer's grid: its rows, trimmed to the positions they need (the bias: both its last axes)
            current = {
                "hidden": _trimmed(hidden, length, [1]),
                "key_mask": _trimmed(key_mask, length, [1]),
                "rows": rows,
                "extents": extents,
            }
            if "position_bias" in inputs:
                current["position_bias"] = _trimmed(inputs["position_bias"].output(0), length, [2, 3])
    return ov.Model(outputs, list(inputs.values()), "early_exit_encoder")


def _trimmed(source, length, axes: list[int]):
    """``source``'s first ``length`` ([1] int64) positions along each of ``axes``."""
    from openvino import opset13 as ops

    stop = length if len(axes) == 1 else ops.concat([length] * len(axes), 0).output(0)
    zeros, ones = np.zeros(len(axes), np.int64), np.ones(len(axes), np.int64)
    return ops.slice(source, zeros, stop, ones, np.array(axes, np.int64)).output(0)


class ExitGraph:
    """The compiled exit graph of one patched model, for one policy kind (its values are inputs).

    ``length_step``, ``row_step`` and ``compact``: :func:`exit_graph_model`'s, the shipped ones by default (the
    benchmarks that read the graph itself build it with others)."""

    def __init__(
        self,
        model: nn.Module,
        adapter,
        heads,
        policy: ExitPolicy,
        *,
        length_step: int = LENGTH_STEP,
        row_step: int = ROW_STEP,
        compact: bool = True,
    ):
        layers = encoder_layers(model)
        self.num_layers = len(layers)
        #: whether the graph takes the encoder's relative position bias (MPNet): :meth:`run`'s ``position_bias``
        self.position_bias = bool(layers[0].position_bias)
        #: the plugin's options over the layers' (the static layers' ``exit_graph_settings``: chosen by timing)
        self.settings = tuple(layers[0].exit_graph_settings)
        #: the grid's lengths are multiples of this, its rows after a compaction of ``row_step``
        self.length_step = length_step
        self._model = exit_graph_model(model, adapter, heads, policy, length_step, row_step, compact=compact)
        self._compiled, self._threads = None, None
        self._requests = threading.local()

    def compiled(self):
        """The compiled model for torch's thread count now (the static layers' settings)."""
        threads = torch.get_num_threads()
        if self._compiled is None or self._threads != threads:
            self._compiled = ov_core().compile_model(self._model, "CPU", compile_config(threads, self.settings))
            self._threads = threads
        return self._compiled

    def with_settings(self, settings: tuple) -> ExitGraph:
        """The same converted graph compiled with the plugin's options ``settings`` (pairs of option and value) in
        place of this one's, with its own compilation and requests; this graph is left as it is (the benchmarks that
        time or profile the graph under other options)."""
        other = copy.copy(self)
        other.settings = tuple(settings)
        other._compiled, other._threads, other._requests = None, None, threading.local()
        return other

    def request(self):
        """The calling thread's infer request on :meth:`compiled` (its profiling, where ``PERF_COUNT`` is among the
        settings)."""
        return thread_request(self._requests, self.compiled())

    def run(self, hidden: torch.Tensor, mask: torch.Tensor | None, policy: ExitPolicy, position_bias=None):
        """``(logits [B, C] float32, exit layer [B] int64, lengths)`` of the embeddings ``hidden`` [B, S, H] with the
        2-D ``mask`` (or None: no padding) under ``policy`` (of this graph's kind); ``position_bias``: the
        encoder's [1, heads, S, S] where the graph takes it (:attr:`position_bias`). ``lengths``: the grid's length
        at each layer (the first the padded batch's, each later one trimmed to what its rows need)."""
        n, length, _ = hidden.shape
        if self.position_bias and (position_bias is None or position_bias.shape[0] != 1):
            raise ValueError("this exit graph takes the encoder's position bias, [1, heads, S, S]")
        key_mask = np.ones((n, length), np.int32) if mask is None else mask.detach().to(torch.int32).cpu().numpy()
        feeds = grid_inputs(hidden, key_mask, position_bias if self.position_bias else None, self.length_step)
        feeds["rows"] = np.arange(n, dtype=np.int64)
        feeds["extents"] = mask_extents(torch.from_numpy(feeds["key_mask"])).numpy()  # as the exact loop trims
        feeds.update(exit_graph_values(policy, self.num_layers))
        # inputs read in place (the call waits); outputs copied out (a few numbers a row)
        request = self.request()
        result = request.infer(feeds, share_inputs=True)
        values = result.to_tuple()  # in the outputs' order
        logits = np.empty((n, values[0].shape[-1]), np.float32)
        exit_layer = np.full(n, self.num_layers, np.int64)
        done = np.zeros(n, bool)
        lengths = [feeds["key_mask"].shape[1]]
        for layer in range(1, self.num_layers):
            z, exits, rows, length = values[4 * (layer - 1) : 4 * layer]
            lengths.append(int(length[0]))
            first = exits & ~done[rows]  # a row kept past its exit (the first survivor) keeps its first one
            logits[rows[first]] = z[first]
            exit_layer[rows[first]] = layer
            done[rows[first]] = True
        z, rows = values[-2:]
        last = ~done[rows]
        logits[rows[last]] = z[last]
        return torch.from_numpy(logits), torch.from_numpy(exit_layer), lengths


def exit_graph(model: nn.Module, adapter, heads, policy: ExitPolicy) -> ExitGraph | None:
    """The model's exit graph for ``policy``'s kind, built once and kept on the model while its layers and heads'
    weights stay the same; None where it cannot run them (:func:`exit_graph_refusal`) or failed to build (logged
    once with the reason: the layer-by-layer loop runs instead)."""
    if exit_graph_refusal(model, adapter, heads, policy) is not None:
        return None
    key = (
        tuple(id(layer) for layer in encoder_layers(model)),
        weights_fingerprint(heads, adapter),
        type(policy),
        bool(getattr(policy, "normalized", False)),
        tuple(encoder_layers(model)[0].exit_graph_settings),
    )
    with _graphs_lock:
        kept = _graphs.get(model)
    if kept is not None and kept[0] == key:
        return kept[1]
    try:
        graph = ExitGraph(model, adapter, heads, policy)
    except Exception as error:  # a converter or plugin that cannot build it: the exact loop is right too
        graph = None
        _log.warning(
            "the exit graph could not be built (%s: %s); the layers run one call each",
            type(error).__name__,
            str(error).splitlines()[0][:300] if str(error) else "",
        )
    with _graphs_lock:
        _graphs[model] = (key, graph)
    return graph


_failures: set[str] = set()


#: The fewest grid positions (rows x padded length) a call runs on the exit graph; a smaller one runs layer by layer.
#: The graph pays a fixed cost a call (its few hundred operations prepared for the call's shapes, whatever the rows),
#: which a small call does not earn back. On the Intel Xeon with AMX, MiniLM-L6 RT on its static layers at 3.06 of 6
#: layers, one thread, texts in arrival order, the loop's time over the graph's (paired median of 16 rounds) was 0.80
#: for single texts (27 positions a call), 0.89 for 2 (67), 0.93 for 4 (158), 1.01 for 8 (362), 1.06 for 16 (768)
#: and 32 (1,672) (``benchmarks/results/intel_xeon/exit_graph_call_size_cpu.json``). 512: between 362 and 768.
#: One constant for every CPU: on the AVX-512 AMD EPYC the loop won at every size (0.65-0.89, ``benchmarks/results/
#: amd_epyc/exit_graph_call_size_cpu.json``), so ``eek fit`` times the loop against the graph on the CPU it fits on
#: and, where the loop wins, turns the graph off for the folder (the layers' ``exit_graph_on``; :func:`exit_graph_refusal`).
GRAPH_MIN_POSITIONS = 512


def run_exit_graph(model: nn.Module, adapter, heads, policy: ExitPolicy, hidden: torch.Tensor, mask):
    """``model``'s early exit on the embeddings ``hidden`` [B, S, H] (2-D ``mask`` or None) in one call of its exit
    graph: an :class:`~earlyexit_kernels.engine.step.batch_loop.ExitResult`, or None where the graph cannot run
    them, the call is smaller than :data:`GRAPH_MIN_POSITIONS` or the call failed (the reason logged once): the
    caller runs the layer-by-layer loop."""
    if hidden.shape[0] * hidden.shape[1] < GRAPH_MIN_POSITIONS:
        return None
    graph = exit_graph(model, adapter, heads, policy)
    if graph is None:
        return None
    try:
        bias = adapter.position_bias(hidden) if graph.position_bias else None
        logits, exit_layer, _ = graph.run(hidden, mask, policy, bias)
    except RuntimeError as error:  # the plugin's own failure (a shape, its memory): this call runs layer by layer
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        if reason not in _failures:
            _failures.add(reason)
            _log.warning("the exit graph failed a call (%s); that call ran its layers one call each", reason)
        return None
    return ExitResult(logits=logits.to(hidden.dtype), exit_layer=exit_layer, layers_run=exit_layer.clone())
