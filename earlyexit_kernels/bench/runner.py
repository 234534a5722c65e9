"""One measurement: every method on one model, one batch of inputs and one exit pattern.

The methods are timed interleaved (each repetition runs every method once, in a
rotating order), so a change of machine load hits all of them alike; each gets one
untimed warm-up call first, whose outputs are checked against the pattern and the naive
baseline. Each repetition also times one encoder layer at every shape the shape-aware
ideal needs (:mod:`.ideal`). Peak memory is measured in a separate, untimed call.

``nonlayer_p50_s`` is the same call with every encoder layer replaced by an identity
(embeddings, heads, exit steps, compaction, write-back and Python only), timed in
``repeats`` further interleaved rounds; ``nonlayer_overhead`` is its excess over the full
model's, as a fraction of the full model's time. It measures what a method adds around
the layers without the noise of the layers' own time. The layers are found through the
family's adapter (:func:`earlyexit_kernels.models.adapter_class`), so this works for every
supported family; what an adapter computes per layer outside the layer module (DeBERTa's
square mask and relative positions, ModernBERT's masks and rotary tables when the shape
changes) counts as non-layer time, as it is time the method adds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Layer

from earlyexit_kernels.bench.baselines import batch_size_one, naive_batched, single_sequence_inputs
from earlyexit_kernels.bench.ideal import ideal_layers, ideal_shape, shape_probes
from earlyexit_kernels.bench.patterns import ExitPattern, make_inputs
from earlyexit_kernels.bench.timing import peak_memory, percentiles, timed_call
from earlyexit_kernels.methods.policies import Scheduled
from earlyexit_kernels.models import adapter_class
from earlyexit_kernels.patching.patch import current_adapter, is_patched, patch, unpatch

__all__ = ["Method", "measure_pattern"]


@dataclass(eq=False)
class Method:
    name: str  # full, eek, naive, bs1
    backend: str
    prepare: Callable[[], None]  # untimed: patch or unpatch the model
    run: Callable[[], object]


def _methods(model, adapter, policy, ids, mask, pattern: ExitPattern, eek_backends: list[str]) -> list[Method]:
    def unpatched():
        if is_patched(model):
            unpatch(model)

    def patched(backend):
        return lambda: patch(model, policy, backend=backend)

    sequences = single_sequence_inputs(ids, mask, pattern.exit_layers)
    methods = [Method("full", "hf", unpatched, lambda: model(input_ids=ids, attention_mask=mask))]
    for backend in eek_backends:
        methods.append(Method("eek", backend, patched(backend), lambda: model(input_ids=ids, attention_mask=mask)))
    methods.append(Method("naive", "torch", unpatched, lambda: naive_batched(adapter, policy, ids, mask)))
    methods.append(Method("bs1", "torch", unpatched, lambda: batch_size_one(adapter, sequences)))
    return methods


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


def _check(out, reference, expected_exits: torch.Tensor, full_logits, f_actual: float, dtype) -> str:
    problems = []
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    if not torch.equal(out.exit_layer.cpu(), expected_exits):
        problems.append("exit_layer differs from the pattern")
    if reference is not None and not torch.allclose(out.logits.float(), reference.logits.float(), **tol):
        diff = (out.logits.float() - reference.logits.float()).abs().max().item()
        problems.append(f"logits differ from naive by {diff:.2e}")
    if f_actual == 0.0 and not torch.allclose(out.logits.float(), full_logits.float(), **tol):
        diff = (out.logits.float() - full_logits.float()).abs().max().item()
        problems.append(f"logits differ from full by {diff:.2e}")
    return "; ".join(problems) or "ok"


def measure_pattern(
    model,
    pattern: ExitPattern,
    *,
    seq_len: int,
    vocab: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    eek_backends: list[str],
    repeats: int,
    measure_memory: bool = True,
) -> list[dict]:
    """Rows (without the environment columns) for every method on ``pattern``."""
    num_layers = model.config.num_hidden_layers
    ids, mask = make_inputs(pattern, seq_len, vocab, pad_id, device)
    policy = Scheduled(pattern.exit_layers.to(device))
    patch(model, policy, backend=eek_backends[0])
    adapter = current_adapter(model)
    methods = _methods(model, adapter, policy, ids, mask, pattern, eek_backends)
    f_actual = pattern.f_actual(num_layers)

    outputs = {}
    for method in methods:  # warm-up, and the outputs to check
        method.prepare()
        outputs[method] = method.run()
    probes = shape_probes(pattern, num_layers, seq_len, adapter, device, dtype)
    for probe in probes.values():
        probe()
    layer_times: dict[tuple[int, int], list[float]] = {shape: [] for shape in probes}
    full_logits = outputs[methods[0]].logits
    naive = next(outputs[m] for m in methods if m.name == "naive")

    times: dict[Method, list[float]] = {m: [] for m in methods}
    for rep in range(repeats):
        shift = rep % len(methods)
        for method in methods[shift:] + methods[:shift]:
            method.prepare()
            seconds, _ = timed_call(method.run, device)
            times[method].append(seconds)
        for shape, probe in probes.items():
            layer_times[shape].append(timed_call(probe, device)[0])

    # Everything but the encoder layers: the same calls with every layer an identity.
    nonlayer: dict[Method, list[float]] = {m: [] for m in methods}
    with layers_as_identity(model):
        for rep in range(repeats):
            shift = rep % len(methods)
            for method in methods[shift:] + methods[:shift]:
                method.prepare()
                nonlayer[method].append(timed_call(method.run, device)[0])

    memory = {}
    if measure_memory:
        for method in methods:
            method.prepare()
            memory[method] = peak_memory(method.run, device)

    ideal_l = ideal_layers(pattern, num_layers)
    ideal_s = ideal_shape(pattern, num_layers, seq_len, {k: statistics.median(v) for k, v in layer_times.items()})
    full_p50 = percentiles(times[methods[0]])["p50"]
    full_mem = memory.get(methods[0])
    rows = []
    for method in methods:
        stats = percentiles(times[method])
        out = outputs[method]
        speedup = full_p50 / stats["p50"]
        syncs = None if method.name == "full" else int(out.host_syncs)
        mem = memory.get(method)
        extra = statistics.median(nonlayer[method]) - statistics.median(nonlayer[methods[0]])
        row = {
            "kind": "e2e",
            "method": method.name,
            "backend": method.backend,
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
            "ideal_layers": ideal_l,
            "ideal_shape": ideal_s,
            "ratio_ideal_layers": speedup / ideal_l,
            "ratio_ideal_shape": speedup / ideal_s,
            "host_syncs": syncs,
            "syncs_per_layer": None if syncs is None else syncs / num_layers,
            "nonlayer_p50_s": statistics.median(nonlayer[method]),
            "nonlayer_overhead": extra / full_p50,
            "peak_mem_bytes": mem,
            "peak_mem_vs_full": mem / full_mem if mem is not None and full_mem else None,
            "check": "ok"
            if method.name == "full"
            else _check(
                out, None if method.name == "naive" else naive, pattern.exit_layers, full_logits, f_actual, dtype
            ),
        }
        rows.append(row)
    if is_patched(model):
        unpatch(model)
    return rows
