"""One measurement: every method on one model, one batch of inputs and one exit pattern.

The methods: the unpatched model (``full``, Hugging Face's eager forward) and, on CUDA, its
strongest peers (``peer``: captured in a CUDA graph, ``torch.compile(mode="reduce-overhead")``,
:mod:`.peers`); the patched model (``eek``) with every backend, per-layer step (``exact``,
``graphed``) and policy asked for: ``Scheduled`` replaying the pattern, and its Entropy variant
(:mod:`.threshold_pattern`), a real ``Entropy`` policy whose heads are set so that the rows leave
on the pattern, paying the head and the decision at every layer as a threshold policy does; and,
unless left out, the baselines ``naive`` (once per policy) and ``bs1`` (``Scheduled``).

Each ``eek`` method is patched once and keeps its record (and with it the graphed step's buffers
and CUDA graphs) from call to call: the patched model is swapped between methods, untimed, never
rebuilt, so a graphed method is captured once and then only replayed, as in a server.

The methods are timed interleaved (each repetition runs every method once, in a
rotating order), so a change of machine load hits all of them alike; each gets one
untimed warm-up call first, whose outputs are checked against the pattern and the naive
baseline. Each repetition also times one encoder layer at every shape the shape-aware
ideal needs (:mod:`.ideal`; on CUDA captured in a CUDA graph and timed by CUDA events).
Peak memory is measured in a separate, untimed call.

``nonlayer_p50_s`` is the same call with every encoder layer replaced by an identity
(embeddings, heads, exit steps, compaction, write-back and Python only), timed in
``repeats`` further interleaved rounds; ``nonlayer_overhead`` is its excess over the full
model's, as a fraction of the full model's time. It measures what a method adds around
the layers without the noise of the layers' own time. The layers are found through the
family's adapter (:func:`earlyexit_kernels.models.adapter_class`), so this works for every
supported family; what an adapter computes per layer outside the layer module (DeBERTa's
square mask and relative positions, ModernBERT's masks and rotary tables when the shape
changes) counts as non-layer time, as it is time the method adds. A graphed ``eek`` method
runs that phase on buffers and graphs of its own (captured with the identities, after one
untimed call); the peers' is not measured (blank): their captured or compiled forward keeps
the real layers.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Layer

from earlyexit_kernels.bench.baselines import batch_size_one, naive_batched, single_sequence_inputs
from earlyexit_kernels.bench.ideal import ideal_layers, ideal_shape, shape_probes, time_probes
from earlyexit_kernels.bench.patterns import ExitPattern, make_inputs
from earlyexit_kernels.bench.peers import PeerModels, PeerUnavailable
from earlyexit_kernels.bench.threshold_pattern import THRESHOLD, PatternNotReproducible, entropy_variant
from earlyexit_kernels.bench.timing import peak_memory, percentiles, timed_call
from earlyexit_kernels.engine.graphed.buckets import default_plan
from earlyexit_kernels.engine.graphed.static_step import StaticBatches
from earlyexit_kernels.engine.graphed.step_graphs import GraphStats
from earlyexit_kernels.engine.step.step_choice import resolve_step
from earlyexit_kernels.methods.policies import Entropy, ExitPolicy, Scheduled
from earlyexit_kernels.models import adapter_class
from earlyexit_kernels.patching.patch import current_adapter, is_patched, patch, unpatch
from earlyexit_kernels.patching.state import attach, state_of

__all__ = ["POLICIES", "MeasureSettings", "Method", "measure_pattern", "policy_label", "resolved_steps"]

#: the policies ``measure_pattern`` runs a pattern with: the pattern replayed, and its Entropy variant
POLICIES = ("scheduled", "entropy")
TIMED, IDENTITY = "timed", "identity"


@dataclass(frozen=True)
class MeasureSettings:
    """What :func:`measure_pattern` runs on a model and a pattern: the inputs' shape and the methods.

    ``seq_len``, ``vocab``, ``pad_id``: the random inputs (:func:`~earlyexit_kernels.bench.patterns.make_inputs`).
    ``device``, ``dtype``: where and in what the model runs. ``eek_backends``: the backends the
    patched model runs on (the first also patches for the Entropy variant's heads). ``repeats``:
    timed rounds. ``measure_memory``: peak memory in an untimed call. ``steps``: the ``step=`` values
    of ``eek.patch`` to run (each resolved; those that resolve alike run once). ``policies``: of
    :data:`POLICIES`. ``peers``: of :data:`~earlyexit_kernels.bench.peers.PEERS`. ``baselines``:
    whether ``naive`` and ``bs1`` run. ``graphed_lags``: the graphed step's lags to time (None: the
    device's plan); a lag other than the device's makes the row's ``step`` read ``graphed-lag<N>``.
    ``graphed_prologue``: also time the graphed step with its prologue captured
    (``StaticBatches(prologue=True)``, the device's lag), rows whose ``step`` reads ``graphed-prologue``.
    ``bucket_sizes``: also time the graphed step, prologue captured, in these bucket sizes (chosen from a
    layer-cost table, :func:`~earlyexit_kernels.engine.graphed.buckets.sizes_from_file`), rows whose ``step``
    reads ``graphed-prologue-buckets``. ``graphed_torch_heads``: also time it, prologue captured, with
    the heads as the model's modules (cuBLAS on a GPU) before the backend's rule, rows whose ``step``
    reads ``graphed-prologue-torchheads``.
    """

    seq_len: int
    vocab: int
    pad_id: int
    device: torch.device
    dtype: torch.dtype
    eek_backends: list[str]
    repeats: int
    measure_memory: bool = True
    steps: tuple[str, ...] = ("auto",)
    policies: tuple[str, ...] = ("scheduled",)
    peers: tuple[str, ...] = ()
    baselines: bool = True
    graphed_lags: tuple[int | None, ...] = (None,)
    graphed_prologue: bool = False
    bucket_sizes: tuple[int, ...] | None = None
    graphed_torch_heads: bool = False


@dataclass(eq=False)
class _Workload:
    """One measurement's model (patched for the pattern, its ``adapter``), pattern and inputs."""

    model: torch.nn.Module
    pattern: ExitPattern
    ids: torch.Tensor
    mask: torch.Tensor
    adapter: object


@dataclass(eq=False)
class Method:
    name: str  # full, peer, eek, naive, bs1
    backend: str
    prepare: Callable[[str], None]  # untimed: patch or unpatch the model, for the phase (TIMED or IDENTITY)
    run: Callable[[], object]
    policy: str = ""  # the policy's code (policy_label), for the methods that exit
    step: str = ""  # eek: the step it runs, resolved
    peer: str = ""  # the unpatched ones: eager, cuda-graphs, compile-reduce-overhead
    nonlayer: bool = True  # whether its time with the layers as identities is measured


def policy_label(policy: ExitPolicy) -> str:
    """What the CSV's ``policy`` column says: the policy's code, ``Scheduled`` without its exit layers."""
    return "Scheduled" if isinstance(policy, Scheduled) else policy.to_code(digits=3)


def resolved_steps(steps, policy: ExitPolicy, device: torch.device) -> list[str]:
    """The distinct steps ``steps`` (``auto``, ``exact``, ``graphed``) run for ``policy`` on ``device``, in order."""
    return list(dict.fromkeys(resolve_step(step, policy, device) for step in steps))


@dataclass(frozen=True)
class GraphedVariant:
    """How a graphed row's static batches are set where not as :class:`StaticBatches` sets them (None:
    its default): ``lag``, the prologue captured, the bucket ``sizes``, the ``head_kernels``."""

    lag: int | None = None
    prologue: bool | None = None
    sizes: tuple[int, ...] | None = None
    head_kernels: str | None = None

    def static_batches(self) -> StaticBatches | None:
        """The static batches of this variant, or None for the device's plan (the patched model's own)."""
        given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return StaticBatches(**given) if given else None

    def label(self, step: str) -> str:
        """The CSV's ``step``: ``graphed-lag<N>`` for a lag not the device's, ``graphed-prologue``,
        ``graphed-prologue-buckets`` in sizes from a layer-cost table, ``graphed-prologue-torchheads``
        with the heads as the model's modules."""
        if self.prologue:
            suffix = "-buckets" if self.sizes is not None else ""
            return f"{step}-prologue{suffix}" + ("-torchheads" if self.head_kernels == "torch" else "")
        return step if self.lag is None else f"{step}-lag{self.lag}"


def _patched_prepare(model, policy: ExitPolicy, backend: str, step: str, variant=GraphedVariant()):
    """Patch ``model`` for this method; from the second call of a phase on, with the record kept
    from its first (the graphed step's buffers and graphs are in it). ``variant``: the graphed step's
    lag, prologue and buckets where not the device's."""
    kept = {}

    def prepare(phase: str) -> None:
        patch(model, policy, backend=backend, step=step)
        if phase in kept:
            attach(model, kept[phase])
        else:
            batches = variant.static_batches()
            if batches is not None:
                state_of(model).static_batches = batches
            kept[phase] = state_of(model)

    return prepare


def _graphed_variants(step: str, settings: MeasureSettings) -> list[GraphedVariant]:
    """The variants a ``step`` method runs with: the graphed step's lags asked for (the device's own
    as None, once), then the device's lag with the prologue captured where asked for, then that in the
    bucket sizes given; one, the device's plan, for the others."""
    if step != "graphed":
        return [GraphedVariant()]
    _, own = default_plan(settings.device.type)
    lags = dict.fromkeys(None if lag == own else lag for lag in settings.graphed_lags)
    variants = [GraphedVariant(lag=lag) for lag in lags]
    if settings.graphed_prologue:
        variants.append(GraphedVariant(prologue=True))
    if settings.bucket_sizes is not None:
        variants.append(GraphedVariant(prologue=True, sizes=tuple(settings.bucket_sizes)))
    if settings.graphed_torch_heads:
        variants.append(GraphedVariant(prologue=True, head_kernels="torch"))
    return variants


def _peer_method(model, peers: PeerModels, peer: str, ids, mask) -> Method:
    made = {}

    def prepare(phase: str) -> None:
        if is_patched(model):
            unpatch(model)
        if "run" not in made:
            made["run"] = peers.runner(peer, ids, mask)

    return Method("peer", peer, prepare, lambda: made["run"](), peer=peer, nonlayer=False)


def _methods(work: _Workload, variants, settings: MeasureSettings, peers: PeerModels | None) -> list[Method]:
    """Every method to time on ``work``: ``full``, the peers, ``eek`` per policy of ``variants``, step and
    backend, and the baselines."""
    model, adapter, ids, mask = work.model, work.adapter, work.ids, work.mask

    def unpatched(phase=TIMED):
        if is_patched(model):
            unpatch(model)

    methods = [Method("full", "hf", unpatched, lambda: model(input_ids=ids, attention_mask=mask), peer="eager")]
    methods += [_peer_method(model, peers, peer, ids, mask) for peer in settings.peers]
    for policy in variants:
        for step in resolved_steps(settings.steps, policy, settings.device):
            for variant in _graphed_variants(step, settings):
                for backend in settings.eek_backends:
                    methods.append(
                        Method(
                            "eek",
                            backend,
                            _patched_prepare(model, policy, backend, step, variant),
                            lambda: model(input_ids=ids, attention_mask=mask),
                            policy=policy_label(policy),
                            step=variant.label(step),
                        )
                    )
    if settings.baselines:
        for policy in variants:
            methods.append(
                Method(
                    "naive",
                    "torch",
                    unpatched,
                    lambda policy=policy: naive_batched(adapter, policy, ids, mask),
                    policy=policy_label(policy),
                )
            )
        sequences = single_sequence_inputs(ids, mask, work.pattern.exit_layers)
        methods.append(
            Method("bs1", "torch", unpatched, lambda: batch_size_one(adapter, sequences), policy="Scheduled")
        )
    return methods


def _graph_stats(method: Method, model) -> GraphStats | None:
    """A copy of the graph counts the graphed ``method``'s record holds (its timed phase's)."""
    method.prepare(TIMED)
    batches = state_of(model).static_batches
    return None if batches is None else dataclasses.replace(batches.stats)


def _graph_columns(stats: GraphStats | None) -> dict:
    if stats is None:
        return {}
    return {
        "graph_captures": stats.captures,
        "graph_replays": stats.replays,
        "graph_eager": stats.eager,
        "first_capture_s": stats.first_capture_s,
        "graph_fallback": stats.fallback or "",
    }


def _layer_modules(model) -> list[torch.nn.Module]:
    """The distinct modules that run the encoder layers of ``model`` (ALBERT: its shared layer groups)."""
    adapter = adapter_class(model)(model, None)
    modules: dict[int, torch.nn.Module] = {}
    for index in range(model.config.num_hidden_layers):
        module = adapter.layer_module(index)
        modules.setdefault(id(module), module)
    return list(modules.values())


def _identity(module: torch.nn.Module):
    """A forward for ``module`` that returns its input in the form the module's own forward returns."""
    if isinstance(module, DebertaV2Layer):  # (output, attention probabilities or None)
        return lambda hidden, *args, **kwargs: (hidden, None)
    return lambda hidden, *args, **kwargs: hidden


@contextmanager
def layers_as_identity(model):
    """Inside: every encoder layer (ALBERT: layer group) of ``model`` returns its input unchanged."""
    modules = _layer_modules(model)
    for module in modules:
        module.forward = _identity(module)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _tolerance(dtype) -> dict:
    return dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)


def _check(out, reference, expected_exits: torch.Tensor, full_logits, f_actual: float, dtype, against="naive") -> str:
    problems = []
    tol = _tolerance(dtype)
    if not torch.equal(out.exit_layer.cpu(), expected_exits):
        problems.append("exit_layer differs from the pattern")
    if reference is not None and not torch.allclose(out.logits.float(), reference.logits.float(), **tol):
        diff = (out.logits.float() - reference.logits.float()).abs().max().item()
        problems.append(f"logits differ from {against} by {diff:.2e}")
    if f_actual == 0.0 and not torch.allclose(out.logits.float(), full_logits.float(), **tol):
        diff = (out.logits.float() - full_logits.float()).abs().max().item()
        problems.append(f"logits differ from full by {diff:.2e}")
    return "; ".join(problems) or "ok"


def _check_peer(out, full_logits, dtype) -> str:
    if torch.allclose(out.logits.float(), full_logits.float(), **_tolerance(dtype)):
        return "ok"
    return f"logits differ from full by {(out.logits.float() - full_logits.float()).abs().max().item():.2e}"


def _kept(method: Method, out):
    """What the checks read of a warm-up output: a peer's outputs live in graph memory the next replay overwrites."""
    return SimpleNamespace(logits=out.logits.clone()) if method.name == "peer" else out


def _skipped_row(pattern: ExitPattern, seq_len: int, num_layers: int, why: str, **what) -> dict:
    return {
        "kind": "e2e",
        "B": pattern.exit_layers.numel(),
        "S": seq_len,
        "L": num_layers,
        "f": pattern.f_target,
        "f_actual": round(pattern.f_actual(num_layers), 4),
        "pattern": pattern.name,
        "repeats": 0,
        "ideal_layers": ideal_layers(pattern, num_layers),
        "check": f"skipped: {why}",
        **what,
    }


def _variants(adapter, pattern, ids, mask, policies, scheduled) -> tuple[list, list, Callable | None]:
    """``(policies to run, why each skipped one was, restore the heads)``."""
    variants, skipped, restore = [], [], None
    for name in policies:
        if name == "scheduled":
            variants.append(scheduled)
        elif name == "entropy":
            try:
                policy, restore = entropy_variant(adapter, pattern, ids, mask)
            except PatternNotReproducible as err:
                label = policy_label(Entropy(THRESHOLD))
                skipped.append((label, f"the Entropy variant cannot follow this pattern: {err}"))
                continue
            variants.append(policy)
        else:
            raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return variants, skipped, restore


def measure_pattern(
    model, pattern: ExitPattern, settings: MeasureSettings, peer_models: PeerModels | None = None
) -> list[dict]:
    """Rows (without the environment columns) for every method of ``settings`` on ``pattern``.

    ``peer_models``: makes the peers of ``settings.peers`` (one per model, so that a compiled peer is
    compiled once per shape; made here when None). A peer that cannot run here and an Entropy variant
    the heads cannot reproduce give one row each, with ``check`` saying ``skipped:`` and why.
    """
    num_layers = model.config.num_hidden_layers
    ids, mask = make_inputs(pattern, settings.seq_len, settings.vocab, settings.pad_id, settings.device)
    if is_patched(model):
        unpatch(model)
    peer_models = peer_models or (PeerModels(model) if settings.peers else None)
    scheduled = Scheduled(pattern.exit_layers.to(settings.device))
    patch(model, scheduled, backend=settings.eek_backends[0])
    work = _Workload(model, pattern, ids, mask, current_adapter(model))
    skipped_rows = []
    variants, skipped, restore = _variants(work.adapter, pattern, ids, mask, settings.policies, scheduled)
    for label, why in skipped:
        for backend in settings.eek_backends:
            skipped_rows.append(
                _skipped_row(pattern, settings.seq_len, num_layers, why, method="eek", backend=backend, policy=label)
            )
    try:
        methods = _methods(work, variants, settings, peer_models)
        rows = _measure(work, methods, settings)
    finally:
        if restore is not None:
            restore()
        if is_patched(model):
            unpatch(model)
    return rows + skipped_rows


def _measure(work: _Workload, methods: list[Method], settings: MeasureSettings) -> list[dict]:
    """Warm up, check and time ``methods`` on ``work`` (interleaved), with the layers and as identities."""
    model, pattern = work.model, work.pattern
    seq_len, device, dtype, repeats = settings.seq_len, settings.device, settings.dtype, settings.repeats
    num_layers = model.config.num_hidden_layers
    f_actual = pattern.f_actual(num_layers)
    skipped_rows = []
    outputs = {}
    for method in list(methods):  # warm-up, and the outputs to check
        try:
            method.prepare(TIMED)
            outputs[method] = _kept(method, method.run())
        except PeerUnavailable as err:
            methods.remove(method)
            skipped_rows.append(
                _skipped_row(
                    pattern, seq_len, num_layers, str(err), method=method.name, backend=method.backend, peer=method.peer
                )
            )
    probes = shape_probes(pattern, num_layers, seq_len, work.adapter, device, dtype)
    for probe in probes.values():
        probe()
    layer_times: dict[tuple[int, int], list[float]] = {shape: [] for shape in probes}
    full = methods[0]
    full_logits = outputs[full].logits
    naive = {m.policy: outputs[m] for m in methods if m.name == "naive"}
    first_eek = next((outputs[m] for m in methods if m.name == "eek"), None)

    times: dict[Method, list[float]] = {m: [] for m in methods}
    for rep in range(repeats):
        shift = rep % len(methods)
        for method in methods[shift:] + methods[:shift]:
            method.prepare(TIMED)
            seconds, _ = timed_call(method.run, device)
            times[method].append(seconds)
        for shape, seconds in time_probes(probes, device).items():
            layer_times[shape].append(seconds)

    # What the graphed rows captured, replayed and ran uncaptured (and why) in the warm-up and timed calls.
    graphs = {m: _graph_stats(m, work.model) for m in methods if m.name == "eek" and m.step.startswith("graphed")}

    # Everything but the encoder layers: the same calls with every layer an identity.
    measured = [m for m in methods if m.nonlayer]
    nonlayer: dict[Method, list[float]] = {m: [] for m in measured}
    with layers_as_identity(model):
        for method in measured:  # untimed: a graphed method captures its identity-phase graphs here
            method.prepare(IDENTITY)
            method.run()
        for rep in range(repeats):
            shift = rep % len(measured)
            for method in measured[shift:] + measured[:shift]:
                method.prepare(IDENTITY)
                nonlayer[method].append(timed_call(method.run, device)[0])

    memory = {}
    if settings.measure_memory:
        for method in methods:
            method.prepare(TIMED)
            memory[method] = peak_memory(method.run, device)

    ideal_l = ideal_layers(pattern, num_layers)
    ideal_s = ideal_shape(pattern, num_layers, seq_len, {k: statistics.median(v) for k, v in layer_times.items()})
    p50 = {m: percentiles(times[m])["p50"] for m in methods}
    full_p50 = p50[full]
    full_mem = memory.get(full)
    checks = {}
    for method in methods:
        out = outputs[method]
        if method.name == "full":
            checks[method] = "ok"
        elif method.name == "peer":
            checks[method] = _check_peer(out, full_logits, dtype)
        else:
            # naive checks its exits; eek its logits against naive (same policy), else the first eek row
            reference, against = None, "naive"
            if method.name != "naive":
                reference = naive.get(method.policy)
            if reference is None and method.name == "eek" and out is not first_eek:
                reference, against = first_eek, "the first eek row"
            checks[method] = _check(out, reference, pattern.exit_layers, full_logits, f_actual, dtype, against)
    unpatched = [m for m in methods if m.peer and checks[m] == "ok"]
    strongest = min(unpatched, key=lambda m: p50[m])
    rows = []
    for method in methods:
        stats = percentiles(times[method])
        out = outputs[method]
        speedup = full_p50 / stats["p50"]
        syncs = None if method.name in ("full", "peer") else int(out.host_syncs)
        mem = memory.get(method)
        extra = None
        if method.nonlayer:
            extra = statistics.median(nonlayer[method]) - statistics.median(nonlayer[full])
        row = {
            "kind": "e2e",
            "method": method.name,
            "backend": method.backend,
            "policy": method.policy,
            "step": method.step,
            "peer": method.peer,
            "B": pattern.exit_layers.numel(),
            "S": seq_len,
            "L": num_layers,
            "f": pattern.f_target,
            "f_actual": round(f_actual, 4),
            "pattern": pattern.name,
            "t_p20_s": stats["p20"],
            "t_p50_s": stats["p50"],
            "t_p80_s": stats["p80"],
            "repeats": repeats,
            "speedup_vs_full": speedup,
            "speedup_vs_peer": p50[strongest] / stats["p50"],
            "strongest_peer": strongest.peer,
            "ideal_layers": ideal_l,
            "ideal_shape": ideal_s,
            "ratio_ideal_layers": speedup / ideal_l,
            "ratio_ideal_shape": speedup / ideal_s,
            "host_syncs": syncs,
            "syncs_per_layer": None if syncs is None else syncs / num_layers,
            "nonlayer_p50_s": statistics.median(nonlayer[method]) if method.nonlayer else None,
            "nonlayer_overhead": None if extra is None else extra / full_p50,
            "peak_mem_bytes": mem,
            "peak_mem_vs_full": mem / full_mem if mem is not None and full_mem else None,
            "check": checks[method],
            **_graph_columns(graphs.get(method)),
        }
        rows.append(row)
    return rows + skipped_rows
