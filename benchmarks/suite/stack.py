"""``python -m benchmarks.suite.stack``: early exit on top of int8, bf16 and torch.compile, beside
ONNX Runtime and OpenVINO.
(The peers, ONNX Runtime and OpenVINO at their best settings: :mod:`benchmarks.suite.stack_peers`.)

The real task (:mod:`earlyexit_kernels.demo.real_task`): all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, its exit
heads fitted and the exit threshold calibrated on the validation split as ``make demo`` does
(:data:`earlyexit_kernels.demo.real_demo.FIT_OPTIONS`, the same cached folder). Every configuration classifies the
same test texts in the same length-sorted batches of 32:

- ``fp32``, ``int8`` (``torch.ao.quantization.quantize_dynamic`` of the encoder's Linear layers, or another int8
  recipe with ``--stack-int8``: ``per-token-ort`` runs the ONNX Runtime layers ``eek serve --dtype int8`` runs,
  ``per-token-ov`` OpenVINO's, ``static-ov`` the static layers, their exit graph compiled as ``eek fit`` compiles it;
  the classifier and the exit heads, a few thousandths of the work, stay float, so the heads run the backend's fused
  per-layer step; docs/usage.md, "int8"), ``bf16`` (``model.to(torch.bfloat16)``) and ``compile``
  (``torch.compile(model, dynamic=True)``, inductor), each as the unpatched model and with early exit (the fitted
  model, quantized, cast or compiled the same way: patch, then quantize);
- peers, where the packages are installed (bench-only, never a dependency of the package):
  ONNX Runtime on the exported graph with its transformer optimizer (BERT fusions), fp32 and dynamic int8
  (``onnxruntime.quantization.quantize_dynamic``); OpenVINO on the exported graph, fp32
  (``INFERENCE_PRECISION_HINT=f32``: on a CPU with bf16 instructions its default is bf16), and static int8 where
  NNCF is installed (``nncf.quantize`` with ``model_type=TRANSFORMER`` on 300 validation texts: what optimum-intel's
  ``OVQuantizer``, which Sentence Transformers' ``export_static_quantized_openvino_model`` calls, runs; the test
  texts are never calibrated on).

After one warm-up pass of each (compilation, allocations), the timed passes are interleaved: repetition ``r`` runs
every configuration once over all batches, in an order rotated by ``r``. Ratios are paired within a repetition and
reported as p20 / p50 / p80 over the repetitions. Accuracy, mean layers and the layer ideal (L / mean layers) come
from the warm-up pass. :mod:`benchmarks.suite.stack_report` turns the CSV into the section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.suite.stack_peers import INPUTS, Config, peer_configs, peer_status
from earlyexit_kernels.bench.results import cpu_name
from earlyexit_kernels.engine.layers import int8_isa, precision
from earlyexit_kernels.engine.layers.precision import INT8_RECIPES
from earlyexit_kernels.integrations.int8_fit import exit_graph_choice
from earlyexit_kernels.patching.state import is_patched

__all__ = ["measure", "rows_of", "run", "torch_configs"]

BATCH = 32
FIELDS = [
    "config",
    "base",
    "early_exit",
    "texts",
    "accuracy",
    "mean_layers",
    "layer_ideal",
    "token_layer_ideal",
    "layer_calls",
    "t_p20_s",
    "t_p50_s",
    "t_p80_s",
    "texts_per_s",
    "vs_fp32_p20",
    "vs_fp32_p50",
    "vs_fp32_p80",
    "vs_base_p20",
    "vs_base_p50",
    "vs_base_p80",
    "vs_ort_int8_p20",
    "vs_ort_int8_p50",
    "vs_ort_int8_p80",
    "repeats",
]


def _torch_config(name: str, base: str, model) -> Config:
    early = is_patched(getattr(model, "_orig_mod", model)) or "early exit" in name  # _orig_mod: torch.compile's

    def run(batch):
        out = model(**{name: batch[name] for name in INPUTS if name in batch})
        layers = getattr(out, "layers_run", None)
        return out.logits.float(), layers

    return Config(name, base, early, run)


def _recipe_description(recipe: str) -> str:
    if recipe == "static-ov":
        return (
            "each encoder layer NNCF's static int8 on OpenVINO (nncf.quantize, model_type=TRANSFORMER), calibrated "
            f"on the first {CALIBRATION_TEXTS} validation texts (earlyexit_kernels.engine.layers.ov_static)"
        )
    return INT8_RECIPES[recipe]


def int8_encoder(model: nn.Module, recipe: str = "all", calibration: list[dict] | None = None) -> nn.Module:
    """A copy of ``model`` with its encoder's Linear layers dynamically quantized to int8 (``recipe``: a key of
    :data:`~earlyexit_kernels.engine.layers.precision.INT8_RECIPES`; ``--stack-int8``), as ``--dtype int8`` serves it;
    ``static-ov`` calibrated on ``calibration`` (the batches OpenVINO's static int8 peer calibrates on)."""
    return precision.int8_encoder(model, recipe, calibration=calibration)


def torch_configs(
    patched,
    full,
    *,
    compile_models: bool = True,
    bf16: bool = True,
    int8_recipe: str = "all",
    calibration: list[dict] | None = None,
    choices: dict | None = None,
) -> list[Config]:
    """fp32, int8, bf16 and compile, each without and with early exit (``patched``: the fitted model); ``choices``
    (optional) receives what was chosen by timing on this CPU (``"exit_graph"``: the static layers' exit graph or
    loop, :func:`~earlyexit_kernels.integrations.int8_fit.exit_graph_choice`'s reason), for the run's meta."""
    early_int8 = int8_encoder(patched, int8_recipe, calibration)
    if int8_recipe == "static-ov" and calibration:  # its exit graph compiled as `eek fit` compiles it on this CPU
        reason = exit_graph_choice(early_int8, calibration).reason
        print(f"int8 + early exit: {reason}", file=sys.stderr)
        if choices is not None:
            choices["exit_graph"] = reason
    configs = [
        _torch_config("fp32", "fp32", full),
        _torch_config("fp32 + early exit", "fp32", patched),
        _torch_config("int8", "int8", int8_encoder(full, int8_recipe, calibration)),
        _torch_config("int8 + early exit", "int8", early_int8),
    ]
    if bf16:
        configs += [
            _torch_config("bf16", "bf16", copy.deepcopy(full).to(torch.bfloat16)),
            _torch_config("bf16 + early exit", "bf16", copy.deepcopy(patched).to(torch.bfloat16)),
        ]
    if compile_models:
        configs += [
            _torch_config("compile", "compile", torch.compile(copy.deepcopy(full), dynamic=True)),
            _torch_config("compile + early exit", "compile", torch.compile(copy.deepcopy(patched), dynamic=True)),
        ]
    return configs


def measure(configs: list[Config], batches: list[dict], labels: torch.Tensor, repeats: int, num_layers: int):
    """One warm-up pass of every configuration (accuracy, layers), then ``repeats`` interleaved timed passes.

    Returns ``{name: {"accuracy", "mean_layers", "tokens", "token_layers", "layer_calls", "warmup_s", "seconds":
    [per repetition]}}`` (tokens: the valid tokens; token-layers: each row's valid tokens times the layers it ran; layer calls: the
    layers each batch ran, summed over the batches); a
    configuration whose warm-up raised gets ``{"error": message}`` instead and is not timed.
    """
    results = {}
    with torch.inference_mode():
        for config in configs:
            correct, layers, start = 0, 0.0, time.perf_counter()
            tokens = token_layers = layer_calls = 0.0
            try:
                for batch in batches:
                    logits, run = config.run(batch)
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                    if run is None:
                        run = torch.full((len(logits),), num_layers)
                    layers += float(run.float().sum())
                    lengths = batch["attention_mask"].sum(1)
                    tokens += float(lengths.sum())
                    token_layers += float((run.float() * lengths).sum())
                    layer_calls += float(run.max())
            except Exception as error:  # reported in the run's notes, not fatal to the other rows
                results[config.name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
                continue
            results[config.name] = {
                "accuracy": correct / len(labels),
                "mean_layers": layers / len(labels),
                "tokens": tokens,
                "token_layers": token_layers,
                "layer_calls": layer_calls,
                "warmup_s": round(time.perf_counter() - start, 1),
                "seconds": [],
            }
            print(f"  warm-up {config.name}: {results[config.name]['warmup_s']} s", file=sys.stderr, flush=True)
        timed = [config for config in configs if "error" not in results[config.name]]
        for rep in range(repeats):
            shift = rep % len(timed)
            for config in timed[shift:] + timed[:shift]:
                start = time.perf_counter()
                for batch in batches:
                    config.run(batch)
                results[config.name]["seconds"].append(time.perf_counter() - start)
            print(f"  repetition {rep + 1} of {repeats} done", file=sys.stderr, flush=True)
    return results


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    ordered = torch.tensor(sorted(values), dtype=torch.float64)
    return tuple(float(torch.quantile(ordered, q)) for q in (0.2, 0.5, 0.8))


def rows_of(configs: list[Config], results: dict, num_layers: int, texts: int) -> list[dict]:
    """One CSV row per configuration: accuracy, layers, pass time and paired ratios (p20 / p50 / p80)."""

    def ratios(name: str, reference: str | None):
        if reference is None or "seconds" not in results.get(reference, {}) or reference == name:
            return {}
        paired = [a / b for a, b in zip(results[reference]["seconds"], results[name]["seconds"])]
        return dict(zip(("p20", "p50", "p80"), _quantiles(paired)))

    rows = []
    for config in configs:
        measured = results[config.name]
        if "error" in measured:
            continue
        p20, p50, p80 = _quantiles(measured["seconds"])
        row = {
            "config": config.name,
            "base": config.base,
            "early_exit": int(config.early_exit),
            "texts": texts,
            "accuracy": round(measured["accuracy"], 5),
            "mean_layers": round(measured["mean_layers"], 4),
            "layer_ideal": round(num_layers / measured["mean_layers"], 4) if config.early_exit else "",
            "token_layer_ideal": round(num_layers * measured["tokens"] / measured["token_layers"], 4)
            if config.early_exit
            else "",
            "layer_calls": int(measured["layer_calls"]),
            "t_p20_s": round(p20, 4),
            "t_p50_s": round(p50, 4),
            "t_p80_s": round(p80, 4),
            "texts_per_s": round(texts / p50, 1),
            "repeats": len(measured["seconds"]),
        }
        for prefix, reference in (
            ("vs_fp32", "fp32"),
            ("vs_base", config.base if config.early_exit else None),
            ("vs_ort_int8", "ONNX Runtime int8" if config.early_exit else None),
        ):
            for q, value in ratios(config.name, reference).items():
                row[f"{prefix}_{q}"] = round(value, 3)
        rows.append({field: row.get(field, "") for field in FIELDS})
    return rows


def cpu_flags() -> dict[str, bool]:
    """Whether this CPU has bf16 and int8 matrix instructions (from /proc/cpuinfo; False elsewhere)."""
    flags = int8_isa.cpu_flags()
    return {name: name in flags for name in ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni")}


def load_task(texts: int | None, folder: Path | None = None):
    """The fitted early-exit model, the unpatched fine-tuned model, the test batches and their labels.

    ``folder``: a patched model folder with its tokenizer (e.g. written by ``eek fit``); default: the one
    ``make demo`` fits on MiniLM-L6."""
    from earlyexit_kernels.demo.real_demo import FIT_OPTIONS, fitted_folder
    from earlyexit_kernels.demo.real_task import FineTuneRecipe, fine_tuned_minilm, load_rotten_tomatoes
    from earlyexit_kernels.patching.fit_record import FitRecord
    from earlyexit_kernels.patching.loading import from_pretrained
    from earlyexit_kernels.patching.patch import unpatch
    from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode, length_sorted_batches

    splits = load_rotten_tomatoes()
    if folder is None:
        _, tokenizer, info = fine_tuned_minilm(FineTuneRecipe(), progress=False)
        folder = fitted_folder(info["path"], dict(FIT_OPTIONS))
        if FitRecord.read(folder) is None:
            raise SystemExit(
                f"the stack benchmark runs the exit heads `make demo` fits; none in {folder}: run `make demo` first"
            )
    else:
        from transformers import AutoTokenizer

        if not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"--stack-folder {folder} holds no model (config.json): give a folder eek fit wrote")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    patched = from_pretrained(str(folder)).eval()
    full = unpatch(copy.deepcopy(patched))
    test = splits["test"]
    count = len(test) if texts is None else min(texts, len(test))
    data = LabelledTexts(test.texts[:count], None, test.labels[:count], "test", "label")
    labels = torch.tensor(test.labels[:count])
    batches = length_sorted_batches(encode(tokenizer, data, FIT_OPTIONS["max_length"]), labels, BATCH)
    return patched, full, batches, labels, str(folder)


CALIBRATION_TEXTS = 300  # optimum-intel's and Sentence Transformers' default calibration subset


def validation_batches(folder, count: int = CALIBRATION_TEXTS) -> list[dict]:
    """The first ``count`` Rotten Tomatoes validation texts in length-sorted batches, tokenized by ``folder``'s
    tokenizer: what a static int8 peer calibrates on, never the test texts it is timed and scored on."""
    from transformers import AutoTokenizer

    from earlyexit_kernels.demo.real_demo import FIT_OPTIONS
    from earlyexit_kernels.demo.real_task import load_rotten_tomatoes
    from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode, length_sorted_batches

    validation = load_rotten_tomatoes()["validation"]
    count = min(count, len(validation))
    data = LabelledTexts(validation.texts[:count], None, validation.labels[:count], "validation", "label")
    labels = torch.tensor(validation.labels[:count])
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return length_sorted_batches(encode(tokenizer, data, FIT_OPTIONS["max_length"]), labels, BATCH)


def parse_args(argv=None) -> argparse.Namespace:
    """The stack's options; they kept their ``--stack-`` names from when the sweep's ``--stack`` ran it (the
    commands recorded with the committed results read the same but for the module)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.suite.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack-texts", type=int, help="the first N test texts (default: all 2,500)")
    parser.add_argument("--stack-no-compile", action="store_true", help="leave out the compile rows")
    parser.add_argument(
        "--stack-no-bf16",
        action="store_true",
        help="leave out the bf16 rows (without bf16 instructions they run several times slower than fp32)",
    )
    parser.add_argument(
        "--stack-int8",
        choices=("all", "ffn-out-float", "per-token", "per-token-ort", "per-token-ov", "static-ov"),
        default="all",
        help="the int8 recipe of the int8 rows (earlyexit_kernels.engine.layers.precision.INT8_RECIPES): all (default), "
        "all but the feed-forward output projections (ffn-out-float), which keeps MPNet-base within 2 points, or "
        "per token x per channel on PyTorch's kernels (per-token), ONNX Runtime's layers (per-token-ort, what "
        "--dtype int8 serves), OpenVINO's (per-token-ov) or NNCF's static int8 layers on OpenVINO, calibrated on the "
        "validation texts OpenVINO's static int8 peer calibrates on (static-ov)",
    )
    parser.add_argument(
        "--stack-folder",
        type=Path,
        help="a patched model folder with its tokenizer (e.g. written by eek fit) instead of make demo's",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (p20/p50/p80 over them)")
    parser.add_argument("--threads", type=int, help="torch's threads (default: 2)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where stack.csv and stack_meta.json go")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv=None) -> int:
    return run(parse_args(argv))


def run(args) -> int:
    """Writes ``stack.csv`` and ``stack_meta.json`` to ``args.output_dir``."""
    from earlyexit_kernels.patching.patch import policy_of

    threads = args.threads or 2
    torch.set_num_threads(threads)
    start, load_before = time.time(), os.getloadavg()
    patched, full, batches, labels, folder = load_task(args.stack_texts, getattr(args, "stack_folder", None))
    int8_recipe = getattr(args, "stack_int8", None) or "all"
    calibration = validation_batches(folder) if peer_status()["nncf"] == "installed" else None
    choices: dict = {}
    configs = torch_configs(
        patched,
        full,
        compile_models=not args.stack_no_compile,
        bf16=not getattr(args, "stack_no_bf16", False),
        int8_recipe=int8_recipe,
        calibration=calibration,
        choices=choices,
    )
    with tempfile.TemporaryDirectory() as scratch:
        try:
            peers, notes = peer_configs(full, batches[0], Path(scratch), threads, calibration)
        except Exception as error:  # an exporter or optimizer this version cannot run: the torch rows stay
            peers, notes = [], {"peers": f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        configs += peers
        layers = full.config.num_hidden_layers
        results = measure(configs, batches, labels, args.repeats, layers)
    rows = rows_of(configs, results, layers, len(labels))
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stack.csv", "w") as handle:
        handle.write(",".join(FIELDS) + "\n")
        for row in rows:
            handle.write(",".join(str(row[f]) for f in FIELDS) + "\n")
    meta = {
        "command": "python -m benchmarks.suite.stack " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "model": (
            "all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (demo.real_task), exit heads of make demo"
            if getattr(args, "stack_folder", None) is None
            else f"{full.config.model_type}, {full.config.num_hidden_layers} layers, from {args.stack_folder}"
        ),
        "fitted_folder": Path(folder).name,
        "policy": policy_of(patched).to_code(4),
        "int8": f"the int8 recipe {int8_recipe}: {_recipe_description(int8_recipe)}",
        **({"int8_exit_graph": choices["exit_graph"]} if "exit_graph" in choices else {}),
        "batches": f"{len(batches)} length-sorted batches of {BATCH}",
        "threads": threads,
        "repeats": args.repeats,
        "seconds": round(time.time() - start, 1),
        "load_avg_before": [round(v, 2) for v in load_before],
        "load_avg_after": [round(v, 2) for v in os.getloadavg()],
        "device_name": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "peers": notes,
        "warmup_s": {name: r["warmup_s"] for name, r in results.items() if "warmup_s" in r},
        "failed": {name: r["error"] for name, r in results.items() if "error" in r},
    }
    (out / "stack_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out / 'stack.csv'} ({len(rows)} rows) in {meta['seconds']} s")
    for row in rows:
        print(
            f"  {row['config']:<22} acc {row['accuracy']:.4f}  layers {row['mean_layers']:.2f}  "
            f"p50 {row['t_p50_s']:.2f} s  vs base {row['vs_base_p50'] or '-'}  vs fp32 {row['vs_fp32_p50'] or '-'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
