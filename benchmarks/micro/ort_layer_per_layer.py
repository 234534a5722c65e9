"""One int8 encoder layer, eek's against ONNX Runtime int8's whole model per layer, at the same shapes (issue 107).

Issue 107's per-layer target: "one layer on eek's fastest runtime, per token, at least 0.9x the same runtime's
full model, per layer, at the same shapes". The stack benchmark reads it from whole passes, where eek's base
also runs its embeddings and head in PyTorch; here the layers alone:

- the peer: ONNX Runtime int8 as the stack benchmark builds it (transformer optimizer, then
  ``quantize_dynamic``: :func:`benchmarks.suite.stack_peers.peer_configs`), once at the classifier's full depth L and
  once cut to its first layer; one layer costs ``(T_L - T_1) / (L - 1)``, the embeddings and the classifier
  cancelling out;
- eek: the same classifier's encoder layers as the ``per-token-ort`` int8 layers
  (:class:`~earlyexit_kernels.engine.layers.ort_layer.OrtLayer`, what ``eek serve --dtype int8`` and
  ``eek classify --dtype int8`` run), called as the engine calls them (the hidden states of the embeddings,
  the model's additive mask, one mask for every layer of a batch), the packing of each call included;
  one layer costs ``T / L``;
- for the whole-model reading beside it: the classifier's own forward (transformers' embeddings, masks and
  head) on eek's layers, against the peer at full depth.

With ``--recipe static-ov`` the same reading for the static int8 layers
(:class:`~earlyexit_kernels.engine.layers.ov_static.StaticOvLayer`, NNCF's quantization of each layer) against
OpenVINO's static int8 whole model (NNCF, transformer preset: the stack's peer), both calibrated on the first
``--calibration-count`` texts of ``--calibration``, never the timed ones. There a fifth reading: the same static
layers as the early-exit forward runs them on the CPU, in one OpenVINO call a batch
(:mod:`~earlyexit_kernels.engine.step.ov_exit_graph`), with a threshold no row passes, so every row runs every layer
(exit heads of the mean-pooled MLP form after each layer included, untrained: their cost does not depend on their
weights), compiled as ``eek fit`` compiles it on this CPU (timed on the calibration texts; ``exit_graph_setting``
in the result); one layer costs ``T / L``.

Both on the same texts in length-sorted batches of ``--batch`` (longest first), tokenized before the timing.
One untimed pass each, then ``--rounds`` rounds in rotated order; the ratio (peer's time per layer / eek's,
above 1 where eek's layer is faster) is paired within a round, its median and range reported::

    python benchmarks/micro/ort_layer_per_layer.py .cache/demo/model --texts .cache/demo/test.csv \\
        --count 640 --rounds 7 --threads 1 --output FILE.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root: benchmarks.suite

import torch

from benchmarks.suite.corpus_peers import read_texts, rotated_rounds, sorted_batches
from benchmarks.suite.script_results import run_conditions, write_json
from benchmarks.suite.stack_peers import peer_configs
from earlyexit_kernels.engine.layers.int8_isa import int8_isa

#: the whole model each recipe's layers are read against, and the key of its build's note
PEERS = {"per-token-ort": ("ONNX Runtime int8", "onnxruntime"), "static-ov": ("OpenVINO int8", "openvino int8")}


def cut_to(model, depth: int):
    """A copy of ``model`` with its first ``depth`` encoder layers only."""
    cut = copy.deepcopy(model)
    cut.base_model.encoder.layer = cut.base_model.encoder.layer[:depth]
    cut.config.num_hidden_layers = depth
    return cut


def peer_session(model, sample: dict, threads: int, recipe: str = "per-token-ort", calibration=None):
    """The whole-model peer of ``recipe``'s layers (:data:`PEERS`) run on ``model`` (the stack benchmark's), built
    in a scratch folder."""
    name, note = PEERS[recipe]
    with tempfile.TemporaryDirectory(prefix="eek-layer-peer-") as scratch:
        configs, notes = peer_configs(model, sample, Path(scratch), threads, calibration)
        found = [config for config in configs if config.name == name]
        if not found:
            raise SystemExit(f"error: {name} is not available here: {notes.get(note)}")
        return found[0].run, notes[note]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a fine-tuned BERT-style or MPNet classifier folder")
    parser.add_argument("--texts", type=Path, required=True, help="a .csv with a text column, or a .txt")
    parser.add_argument("--count", type=int, default=640, help="how many texts (default 640)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--recipe", choices=tuple(PEERS), default="per-token-ort", help="eek's int8 layers")
    parser.add_argument("--calibration", type=Path, help="static-ov: the texts both sides calibrate on (not --texts)")
    parser.add_argument("--calibration-count", type=int, default=300)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.count < args.batch:
        parser.error("--rounds must be at least 1 and --count at least one --batch")
    if args.recipe == "static-ov" and args.calibration is None:
        parser.error("--recipe static-ov calibrates on --calibration texts")
    peer = PEERS[args.recipe][0]
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from earlyexit_kernels.engine.layers.ort_layer import OrtLayer, encoder_layers

    mpnet = AutoConfig.from_pretrained(args.folder).model_type == "mpnet"  # its layers take a position bias
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForSequenceClassification.from_pretrained(args.folder, dtype=torch.float32).eval()
    depth = model.config.num_hidden_layers
    if depth < 2:
        raise SystemExit(f"error: {args.folder} has {depth} layer; the peer's layer is a difference of two depths")
    limit = min(model.config.max_position_embeddings, tokenizer.model_max_length or 512)
    texts = read_texts(args.texts)[: args.count]
    batches = [
        dict(tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"))
        for _, chunk in sorted_batches(tokenizer, texts, args.batch, limit)
    ]
    calibration = None
    if args.calibration is not None:
        chosen = read_texts(args.calibration)[: args.calibration_count]
        calibration = [
            dict(tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt"))
            for _, chunk in sorted_batches(tokenizer, chosen, args.batch, limit)
        ]
    runs, notes = {}, []
    for name, cut in ((f"{peer}, {depth} layers", model), (f"{peer}, 1 layer", cut_to(model, 1))):
        run, note = peer_session(cut, batches[0], args.threads, args.recipe, calibration)
        runs[name] = lambda run=run: [run(batch) for batch in batches]
        notes.append(note)

    eek_model = copy.deepcopy(model)
    if args.recipe == "static-ov":
        from earlyexit_kernels.engine.layers.ov_static import static_int8_encoder

        static_int8_encoder(eek_model, calibration)
    else:
        OrtLayer.run_encoder_on(eek_model, int8=True)
    layers = encoder_layers(eek_model)
    with torch.no_grad():  # as the engines run (no_grad: the layers' mask tables are made once a batch)
        # the engine's inputs to its layers: the embeddings' hidden states, one additive mask a batch and, for
        # MPNet, the encoder's relative position bias of the batch's length (made once a batch, as the engine keeps it)
        inputs = []
        for b in batches:
            if mpnet:
                hidden = eek_model.base_model.embeddings(input_ids=b["input_ids"])
                extra = {"position_bias": eek_model.base_model.encoder.compute_position_bias(hidden[:1])}
            else:
                hidden = eek_model.base_model.embeddings(
                    input_ids=b["input_ids"], token_type_ids=b.get("token_type_ids")
                )
                extra = {}
            mask = torch.where(b["attention_mask"].bool(), 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
            inputs.append((hidden, mask, extra))

    def eek_layers():
        for hidden, mask, extra in inputs:
            for layer in layers:
                out = layer(hidden, mask, **extra)
                hidden = out[0] if isinstance(out, tuple) else out

    runs[f"eek {args.recipe} layers"] = eek_layers
    # the same layers in the classifier's own forward (transformers' embeddings, masks and head around them)
    runs[f"the classifier on eek's layers, {depth} layers"] = lambda: [eek_model(**batch) for batch in batches]
    if args.recipe == "static-ov":
        runs["eek static-ov layers in one call (the exit graph, no row leaving)"], graph_setting = exit_graph_run(
            eek_model, batches, inputs, calibration
        )
    with torch.no_grad():
        for run in runs.values():  # untimed: sessions' first calls, allocations
            run()
        seconds = rotated_rounds(runs, args.rounds)
    full, one, eek, whole, *graphed = seconds.values()
    peer_layer = [(a - b) / (depth - 1) for a, b in zip(full, one, strict=True)]
    eek_layer = [t / depth for t in eek]
    ratios = [p / e for p, e in zip(peer_layer, eek_layer, strict=True)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    result = {
        **run_conditions("benchmarks/micro/ort_layer_per_layer.py", argv, started),
        "what": f"one int8 layer: eek's {args.recipe} layer against {peer}'s whole model per layer "
        "((T_L - T_1) / (L - 1)), the same length-sorted batches",
        "recipe": args.recipe,
        "isa": int8_isa(),
        "folder": str(args.folder),
        "texts": len(texts),
        "tokens": tokens,
        "batch": args.batch,
        "layers": depth,
        "peer": notes[0],  # the full depth's build (the cut model's fusions count one layer)
        "pass_seconds": seconds,  # each configuration's passes, round by round
        "ms_per_layer": {
            "peer": [round(t * 1e3, 2) for t in peer_layer],
            "eek": [round(t * 1e3, 2) for t in eek_layer],
        },
        "ratio_per_round": [round(r, 4) for r in ratios],
        "ratio_median": round(statistics.median(ratios), 4),
        "whole_model_ratio_per_round": [round(a / b, 4) for a, b in zip(full, whole, strict=True)],
    }
    if graphed:
        result["exit_graph_setting"] = graph_setting
        graph_layer = [t / depth for t in graphed[0]]
        graph_ratios = [p / g for p, g in zip(peer_layer, graph_layer, strict=True)]
        result["ms_per_layer"]["eek_exit_graph"] = [round(t * 1e3, 2) for t in graph_layer]
        result["exit_graph_ratio_per_round"] = [round(r, 4) for r in graph_ratios]
        result["exit_graph_ratio_median"] = round(statistics.median(graph_ratios), 4)
    write_json(args.output, result)
    if min(peer_layer) <= 0:  # T_L - T_1 within the passes' noise: the ratio says nothing about the layers
        print(
            f"warning: in {sum(t <= 0 for t in peer_layer)} of {args.rounds} rounds the full model ran no slower "
            f"than its first layer alone; the per-layer ratio there is noise (give more --count or --rounds)",
            file=sys.stderr,
        )
    print(
        f"{len(texts)} texts, {tokens} tokens, {depth} layers, {args.rounds} rounds, {args.threads} thread(s), "
        f"{int8_isa()} CPU\n"
        f"{peer}, one layer of the whole model: {statistics.median(peer_layer) * 1e3:.1f} ms a pass\n"
        f"eek's {args.recipe} layer: {statistics.median(eek_layer) * 1e3:.1f} ms a pass\n"
        f"peer / eek per layer: {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})\n"
        f"whole model, {peer} / the classifier's forward on eek's layers: "
        f"{statistics.median(a / b for a, b in zip(full, whole, strict=True)):.3f}"
    )
    if graphed:
        print(
            f"peer / eek's layers in one call (the exit graph, heads included) per layer: "
            f"{result['exit_graph_ratio_median']:.3f} (rounds {min(graph_ratios):.3f}-{max(graph_ratios):.3f})"
        )
    return 0


def exit_graph_run(model, batches: list[dict], inputs: list[tuple], calibration: list[dict]):
    """``(a pass, how the graph is compiled and why)``: ``model``'s static int8 layers (a float classifier whose layers
    :func:`~earlyexit_kernels.engine.layers.ov_static.static_int8_encoder` swapped) through the exit graph, every row
    at full depth: the embeddings' hidden states of ``inputs`` (as the layers' reading takes them), the batches' 2-D
    masks and, for MPNet, the position bias. The graph compiled as ``eek fit`` compiles it on this CPU, timed on the
    ``calibration`` batches (:func:`~earlyexit_kernels.integrations.int8_fit.exit_graph_choice`)."""
    import earlyexit_kernels as eek
    from earlyexit_kernels.engine.layers.runtime_choice import graph_on
    from earlyexit_kernels.engine.step.ov_exit_graph import exit_graph
    from earlyexit_kernels.integrations.int8_fit import exit_graph_choice
    from earlyexit_kernels.patching.patch import current_adapter, policy_of

    patched = eek.patch(copy.deepcopy(model), eek.Entropy(0.0), head="mlp", pooling="mean")  # entropy < 0: never
    chosen = exit_graph_choice(patched, calibration)
    setting = chosen.reason
    if not chosen.graph:  # eek fit would run these layers one call each here; this reads the graph itself
        graph_on(patched)
        setting += "; read here all the same: the exit graph at the layers' settings"
    adapter, policy = current_adapter(patched), policy_of(patched)
    graph = exit_graph(patched, adapter, patched.early_exit_heads, policy)
    if graph is None:
        raise SystemExit("error: the exit graph cannot run these layers (see the log above)")
    calls = [
        (hidden, batch["attention_mask"], extra.get("position_bias"))
        for (hidden, _, extra), batch in zip(inputs, batches, strict=True)
    ]

    def run():
        for hidden, mask, bias in calls:
            graph.run(hidden, mask, policy, bias)

    return run, setting


if __name__ == "__main__":
    raise SystemExit(main())
