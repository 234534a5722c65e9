"""Where the exit graph's layers spend their time against OpenVINO static int8's whole model: the plugin's own profile.

Issue 107's per-layer reading (``ort_layer_per_layer.py --recipe static-ov``) puts the static int8 layers in one
call of the exit graph at 0.835x the peer's whole model per layer, at full depth. Wall time cannot say where the
rest goes; the CPU plugin's profile can: compiled with ``PERF_COUNT``, each request reports every executed node's
time, its type (after the plugin's fusions) and the kernel it ran (``exec_type``: ``brgemm_avx512_amx_I8``,
``jit_avx512_f32``, ...). This compiles, both with profiling on:

- the peer: the classifier exported to ONNX and quantized by NNCF (transformer preset), as the stack benchmark
  builds its OpenVINO static int8 (:func:`benchmarks.suite.stack_peers.export_onnx`), on ``--calibration``'s texts;
- eek: the same classifier's static int8 layers (NNCF on each layer, on the same texts) in one exit graph, every row
  at full depth (a threshold no row passes), each layer's mean-pooled MLP exit head included (untrained: its cost
  does not depend on its weights), the embeddings fed from torch as the forward feeds them;

each in both plugin settings the stack weighs (its default, and fused-subgraph code generation off), the graph also
on its grid padded to multiples of each ``--length-steps`` (8: the shipped
:data:`~earlyexit_kernels.engine.layers.packed_call_shapes.LENGTH_STEP`, the shapes the plugin meets fewer; 1: no
padding, the peer's grid), and runs every configuration on the same length-sorted batches of ``--batch`` (longest
first): a first pass each (its shapes' preparation, recorded apart), then ``--passes`` passes in alternating order.
``--without-compaction`` adds, at each length step and setting, the exit graph built without its compaction (its
heads and decisions, every row on the grid it came in on: no data-dependent shape; at full depth the same work).
``--layers-alone`` adds, at each length step and setting, the same static layers' IR wired one into the next with
no exit step or head between them: what the exit graph costs beyond its layers (its heads, its exit steps, the
shapes it computes inside), and what the layers cost in one compiled model against the peer's whole model.
Per configuration: the summed node time a pass (median over passes) by node type, by kernel and, for the products,
by role (query, key, value, attention output, intermediate, output, exit heads); the wall time a pass, and the shipped
graph's (the first step, the default setting) over it, paired within a round. Timings with the plugin's profiling
on, each side's overhead its own::

    python benchmarks/micro/exit_graph_profile.py .cache/demo/model --texts .cache/demo/test.csv \\
        --calibration .cache/demo/validation.csv --count 320 --passes 5 --threads 1 --output FILE.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

from benchmarks.suite.corpus_peers import read_texts, sorted_batches
from benchmarks.suite.script_results import run_conditions, write_json

#: the plugin settings profiled, over each side's own options (the stack's peer is timed in both)
SETTINGS = {"default": {}, "fused-subgraph code generation off": {"SNIPPETS_MODE": "DISABLE"}}
#: the role of a product node by its name (the ONNX export's ``.../attention/self/query/MatMul``, the exit graph's
#: ``layer1/__module.layer.attention.self.query/...``): the products keep their names through the plugin's fusions,
#: where the nodes between them get generated ones
ROLES = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
    "classifiers",
    "pooler",
)


def role_of(node_name: str) -> str:
    """``node_name``'s product role (:data:`ROLES`), or ``"other"``."""
    dotted = node_name.replace("/", ".")
    return next((role for role in ROLES if role in dotted), "other")


def profile_of(requests_infos: list[list]) -> dict:
    """``{"total", "by_type", "by_kernel", "products_by_role"}``: ms a pass (medians over passes) of the profiles
    ``requests_infos`` (one list of the plugin's ``ProfilingInfo`` a pass, every call of the pass in it);
    ``products_by_role``: the fully connected and matrix product nodes' time by :func:`role_of`."""
    passes = []
    for infos in requests_infos:
        sums = defaultdict(float)
        for info in infos:
            if info.status.name != "EXECUTED":
                continue
            ms = info.real_time.total_seconds() * 1e3
            sums["total"] += ms
            sums[f"type:{info.node_type}"] += ms
            sums[f"kernel:{info.exec_type}"] += ms
            if info.node_type in ("FullyConnected", "FullyConnectedQuantizedLegacy", "MatMul"):
                sums[f"role:{info.node_type} {role_of(info.node_name)}"] += ms
        passes.append(sums)
    keys = sorted({key for sums in passes for key in sums})
    medians = {key: statistics.median(sums.get(key, 0.0) for sums in passes) for key in keys}

    def part(prefix: str) -> dict:
        chosen = {k[len(prefix) :]: round(v, 3) for k, v in medians.items() if k.startswith(prefix)}
        return dict(sorted(chosen.items(), key=lambda kv: -kv[1]))

    return {
        "total": round(medians["total"], 3),
        "by_type": part("type:"),
        "by_kernel": part("kernel:"),
        "products_by_role": part("role:"),
    }


def peer_model(model, sample: dict, calibration: list[dict], scratch: Path):
    """The stack's OpenVINO static int8 peer, uncompiled: ``model`` exported to ONNX and quantized by NNCF."""
    import nncf

    from benchmarks.suite.stack_peers import export_onnx, numpy_inputs
    from earlyexit_kernels.engine.layers.ov_layer import ov_core

    exported = export_onnx(model, sample, scratch)
    dataset = nncf.Dataset(calibration, numpy_inputs)
    return nncf.quantize(
        ov_core().read_model(str(exported)),
        dataset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
    )


def peer_pass(quantized, batches: list[dict], threads: int, settings: dict):
    """``(one pass, its request)``: the peer compiled as the stack compiles it, with ``settings`` and profiling."""
    from benchmarks.suite.stack_peers import numpy_inputs
    from earlyexit_kernels.engine.layers.ov_layer import ov_core

    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov_core().compile_model(quantized, "CPU", {**config, **settings, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    feeds = [numpy_inputs(batch) for batch in batches]
    return _profiled(lambda feed: request.infer(feed), request, feeds), request


def graph_pass(eek_model, batches: list[dict], inputs: list, settings: dict, step: int, compact: bool = True):
    """``(one pass, its request)``: ``eek_model``'s static layers in one exit graph on a grid padded to multiples of
    ``step``, every row at full depth, compiled with the layers' options, ``settings`` and profiling;
    ``compact=False``: the graph built without its compaction (``exit_graph_model(compact=False)``: the same heads
    and decisions, every row on the grid it came in on, no data-dependent shape)."""
    import earlyexit_kernels as eek
    from earlyexit_kernels.engine.step.ov_exit_graph import ExitGraph
    from earlyexit_kernels.patching.patch import current_adapter, policy_of

    patched = eek.patch(copy.deepcopy(eek_model), eek.Entropy(0.0), head="mlp", pooling="mean")  # never exits
    adapter, policy = current_adapter(patched), policy_of(patched)
    graph = ExitGraph(patched, adapter, patched.early_exit_heads, policy, length_step=step, compact=compact)
    graph = graph.with_settings((*graph.settings, *settings.items(), ("PERF_COUNT", True)))
    request = graph.request()
    calls = [(hidden, batch["attention_mask"]) for hidden, batch in zip(inputs, batches, strict=True)]
    return _profiled(lambda call: graph.run(call[0], call[1], policy), request, calls), request


def layers_alone_pass(eek_model, batches: list[dict], inputs: list, settings: dict, step: int):
    """``(one pass, its request)``: ``--layers-alone``: the same static layers' IR wired one into the next in one
    compiled model, with no exit step and no head between them (every row at full depth, the grid as it came in), on a
    grid padded to multiples of ``step``, compiled with the layers' options, ``settings`` and profiling: what the exit
    graph costs beyond its layers, and what the layers cost in one compiled model against the peer's."""
    import openvino as ov
    from openvino import opset13 as ops

    from earlyexit_kernels.engine.layers.ort_layer import encoder_layers
    from earlyexit_kernels.engine.layers.ov_layer import compile_config, ov_core
    from earlyexit_kernels.engine.layers.ov_static import grid_inputs
    from earlyexit_kernels.engine.step.ov_exit_graph import wired_layer

    width = eek_model.config.hidden_size
    parameters = {
        "hidden": ops.parameter([-1, -1, width], ov.Type.f32, name="hidden"),
        "key_mask": ops.parameter([-1, -1], ov.Type.i32, name="key_mask"),
    }
    for name, parameter in parameters.items():
        parameter.output(0).get_tensor().set_names({name})
    current = {name: parameter.output(0) for name, parameter in parameters.items()}
    for index, layer in enumerate(encoder_layers(eek_model), start=1):  # as the exit graph wires them, nothing between
        current = {"hidden": wired_layer(layer, index, current), "key_mask": current["key_mask"]}
    model = ov.Model([current["hidden"]], list(parameters.values()), "static_layers_alone")
    threads = torch.get_num_threads()
    compiled = ov_core().compile_model(model, "CPU", {**compile_config(threads, ()), **settings, "PERF_COUNT": True})
    request = compiled.create_infer_request()

    def call(item):  # the grid made per call, as the exit graph's run makes it
        hidden, mask = item
        request.infer(grid_inputs(hidden, mask.to(torch.int32).numpy(), None, step), share_inputs=True)

    calls = [(hidden, batch["attention_mask"]) for hidden, batch in zip(inputs, batches, strict=True)]
    return _profiled(call, request, calls), request


def _profiled(call, request, items: list):
    def one_pass() -> tuple[list, float]:
        infos = []
        with torch.no_grad():
            start = time.perf_counter()
            for item in items:
                call(item)
                infos += request.get_profiling_info()
            return infos, time.perf_counter() - start

    return one_pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a fine-tuned BERT-style classifier folder")
    parser.add_argument("--texts", type=Path, required=True, help="a .csv with a text column, or a .txt")
    parser.add_argument("--calibration", type=Path, required=True, help="the texts both sides calibrate on")
    parser.add_argument("--calibration-count", type=int, default=300)
    parser.add_argument("--count", type=int, default=320, help="how many texts (default 320)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--length-steps",
        type=int,
        nargs="+",
        default=[8, 1],
        help="the exit graph's grid padded to multiples of each (default 8, the shipped step, and 1: no padding)",
    )
    parser.add_argument(
        "--layers-alone",
        action="store_true",
        help="also the static layers wired one into the next with no exit step or head between them, at each length "
        "step and setting: what the graph costs beyond its layers",
    )
    parser.add_argument(
        "--without-compaction",
        action="store_true",
        help="also the exit graph built without its compaction (its heads and decisions, every row on the grid it came "
        "in on), at each length step and setting: the exit steps' cost apart from the compaction's",
    )
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.passes < 1 or args.count < args.batch:
        parser.error("--passes must be at least 1 and --count at least one --batch")
    if min(args.length_steps) < 1:
        parser.error("--length-steps are positive")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from earlyexit_kernels.engine.layers.int8_isa import int8_isa
    from earlyexit_kernels.engine.layers.ov_static import static_int8_encoder

    if AutoConfig.from_pretrained(args.folder).model_type == "mpnet":
        parser.error("a BERT-style classifier: the graph's MPNet position bias is not fed here")
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder, dtype=torch.float32).eval()
    limit = min(model.config.max_position_embeddings, tokenizer.model_max_length or 512)

    def batched(texts):
        return [
            dict(tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"))
            for _, chunk in sorted_batches(tokenizer, texts, args.batch, limit)
        ]

    batches = batched(read_texts(args.texts)[: args.count])
    calibration = batched(read_texts(args.calibration)[: args.calibration_count])
    with tempfile.TemporaryDirectory(prefix="eek-profile-peer-") as scratch:
        quantized = peer_model(model, batches[0], calibration, Path(scratch))
    eek_model = static_int8_encoder(copy.deepcopy(model), calibration)
    with torch.no_grad():
        inputs = [
            eek_model.base_model.embeddings(input_ids=b["input_ids"], token_type_ids=b.get("token_type_ids"))
            for b in batches
        ]
    passes = {}  # one pass of each configuration, the shipped graph first
    for step in args.length_steps:
        for name, settings in SETTINGS.items():
            passes[f"eek exit graph, length step {step}, {name}"] = graph_pass(
                eek_model, batches, inputs, settings, step
            )[0]
    for step in args.length_steps if args.without_compaction else ():
        for name, settings in SETTINGS.items():
            passes[f"eek exit graph without compaction, length step {step}, {name}"] = graph_pass(
                eek_model, batches, inputs, settings, step, compact=False
            )[0]
    for step in args.length_steps if args.layers_alone else ():
        for name, settings in SETTINGS.items():
            passes[f"eek static layers alone, length step {step}, {name}"] = layers_alone_pass(
                eek_model, batches, inputs, settings, step
            )[0]
    for name, settings in SETTINGS.items():
        passes[f"OpenVINO static int8 whole model, {name}"] = peer_pass(quantized, batches, args.threads, settings)[0]
    profiles, seconds = {name: [] for name in passes}, {name: [] for name in passes}
    first = {}
    for round_ in range(args.passes + 1):  # round 0: each configuration's first pass (its shapes met), apart
        names = list(passes) if round_ % 2 == 0 else list(reversed(passes))
        for name in names:
            infos, elapsed = passes[name]()
            if round_:
                profiles[name].append(infos)
                seconds[name].append(elapsed)
            else:
                first[name] = elapsed
    shipped = next(iter(passes))
    results = {}
    for name in passes:
        ratios = [a / b for a, b in zip(seconds[shipped], seconds[name], strict=True)]
        results[name] = {
            "first_pass_ms": round(first[name] * 1e3, 1),
            "wall_ms_per_pass": [round(t * 1e3, 1) for t in seconds[name]],
            # the shipped graph's time over this one's in the same round: above 1 where this one is faster
            "shipped_over_this": round(statistics.median(ratios), 4),
            "shipped_over_this_range": [round(min(ratios), 4), round(max(ratios), 4)],
            **profile_of(profiles[name]),
        }
    depth = model.config.num_hidden_layers
    write_json(
        args.output,
        {
            **run_conditions("benchmarks/micro/exit_graph_profile.py", argv, started),
            "what": "the CPU plugin's profile (PERF_COUNT) of OpenVINO static int8's whole model and of eek's static "
            "int8 layers in one exit graph at full depth (grid length steps, plugin settings), ms a pass (median over "
            "alternating passes) by node type, kernel and product role; wall time paired against the shipped graph",
            "isa": int8_isa(),
            "folder": str(args.folder),
            "texts": len(read_texts(args.texts)[: args.count]),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "positions": {
                "peer": sum(b["input_ids"].numel() for b in batches),
                **{
                    f"length step {step}": sum(
                        len(b["input_ids"]) * -(-b["input_ids"].shape[1] // step) * step for b in batches
                    )
                    for step in args.length_steps
                },
            },
            "batch": args.batch,
            "layers": depth,
            "passes": args.passes,
            "profiles": results,
        },
    )
    for name, result in results.items():
        top = ", ".join(f"{k} {v:.0f}" for k, v in list(result["by_type"].items())[:8])
        print(
            f"{name}: wall {statistics.median(seconds[name]) * 1e3:.0f} ms a pass (first {result['first_pass_ms']:.0f}), "
            f"shipped/this {result['shipped_over_this']:.3f}; profile {result['total']:.0f} ms: {top}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
