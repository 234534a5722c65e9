"""The real model served beside Infinity's configurations of the same weights, then a soak:
``python -m benchmarks.suite.serve_peers_cli --rotten-tomatoes`` (or ``--model``), from the repository's
root; the load levels' arguments are ``eek bench serve``'s. Also the models it builds: ``eek fit`` and ``eek calibrate --dtype int8`` on the
fine-tuned classifier, the first time, under ``--models-dir``. What runs is
:mod:`benchmarks.suite.serve_peers`.
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.suite.serve_drive import default_cores
from benchmarks.suite.serve_peers import DEFAULT_SERVERS, SERVERS, PeersConfig, render, run, write_readme
from earlyexit_kernels.bench.serve_load import add_level_arguments
from earlyexit_kernels.bench.server_process import parse_cores

__all__ = ["rotten_tomatoes", "add_arguments", "wanted", "main", "BACKBONES"]

#: what --backbone all runs, in this order
BACKBONES = ("minilm", "mpnet")
#: the int8 folder's second budget (``eek calibrate --max-changed``, points): the answers Infinity's ONNX Runtime
#: int8 model changes of the float32 full model's on the test split (3.66% MiniLM-L6, 5.62-5.64% MPNet-base,
#: ``docs/serving.md`` on 11-28 and 11-26), rounded down to half a point, so that the certificate promises at least
#: the peer's agreement beside its 1 point of accuracy lost
MAX_CHANGED = {"minilm": 3.5, "mpnet": 5.5}
#: the texts OpenVINO static int8 is quantized on (NNCF), as the stack benchmark's
CALIBRATION_TEXTS = 300


def _certified_copy(int8_model: Path, model: Path, max_changed: float) -> bool:
    """Whether ``int8_model`` is ``model``'s weights certified on the int8 recipe its family takes here, with
    ``eek calibrate``'s default risk (against the float32 full model) and ``max_changed``: a copy of another fit's
    weights, one certified on another recipe (ONNX Runtime installed since, or removed), on another risk (the int8
    full depth's, the default before) or with another second budget, is made again."""
    from earlyexit_kernels.integrations.model_folder import family_int8_recipe
    from earlyexit_kernels.patching.fit_record import FitRecord, FitRecordError

    weights = "model.safetensors"
    if not (int8_model / weights).is_file():
        return False
    try:
        record = FitRecord.load(int8_model)
    except FitRecordError:
        return False
    changed = (record.certificate or {}).get("changed_budget")
    return (
        record.int8_recipe == family_int8_recipe(model)
        and record.base_risk == "reference"
        and changed is not None
        and abs(100 * changed - max_changed) < 1e-9
        and filecmp.cmp(int8_model / weights, model / weights, shallow=False)
    )


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()]


def _validation_texts() -> list[str]:
    """The first :data:`CALIBRATION_TEXTS` of Rotten Tomatoes' validation split: what OpenVINO int8 is quantized on."""
    from earlyexit_kernels.demo import real_task

    return real_task.load_rotten_tomatoes()["validation"].texts[:CALIBRATION_TEXTS]


def rotten_tomatoes(
    models_dir: Path, backbone: str = "minilm", progress=print
) -> tuple[Path, Path, Path, list[str], str]:
    """Issue 53's model: (MODEL, PLAIN, INT8_MODEL, texts, what they are).

    PLAIN: ``backbone`` (MiniLM-L6, or MPNet-base) fine-tuned on the Rotten Tomatoes train split
    (:func:`earlyexit_kernels.demo.real_task.fine_tuned_model`, cached); MODEL: ``eek fit`` on it
    with the train split as TRAIN_FILE and the validation split as ``--calibration``, written
    under ``models_dir`` when absent; INT8_MODEL: a copy of MODEL certified again on the int8 base
    (``eek calibrate --dtype int8 --max-changed`` :data:`MAX_CHANGED` on the validation split); the texts: the
    test split, which none of them saw.
    """
    from earlyexit_kernels.demo import real_task

    _, _, info = real_task.fine_tuned_model(backbone, task="rotten_tomatoes", progress=False)
    plain = Path(info["path"])
    splits = real_task.load_rotten_tomatoes()
    model = models_dir / f"eek-{backbone}-rt"
    if not (model / "config.json").is_file():
        models_dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for split in ("train", "validation"):
            files[split] = models_dir / f"rt-{split}.csv"
            with open(files[split], "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(["text", "label"])
                writer.writerows(zip(splits[split].texts, splits[split].labels, strict=True))
        command = [sys.executable, "-m", "earlyexit_kernels", "fit", str(plain), str(files["train"]), str(model)]
        command += ["--calibration", str(files["validation"]), "--no-progress"]
        progress("eek fit: " + " ".join(command))
        subprocess.run(command, check=True)
    int8_model = models_dir / f"eek-{backbone}-rt-int8"
    if not _certified_copy(int8_model, model, MAX_CHANGED[backbone]):
        shutil.rmtree(int8_model, ignore_errors=True)
        shutil.copytree(model, int8_model)
        validation = models_dir / "rt-validation.csv"
        command = [sys.executable, "-m", "earlyexit_kernels", "calibrate", str(int8_model), str(validation)]
        command += ["--dtype", "int8", "--max-changed", f"{MAX_CHANGED[backbone]:g}", "--no-progress"]
        progress("eek calibrate: " + " ".join(command))
        subprocess.run(command, check=True)
    texts = splits["test"].texts
    name = {"minilm": "MiniLM-L6", "mpnet": "MPNet-base"}[backbone]
    source = f"{name} fine-tuned on Rotten Tomatoes, the test split's {len(texts)} snippets"
    return model, plain, int8_model, texts, source


def add_arguments(parser) -> None:
    real = parser.add_argument_group("the real model beside its peers (issue 53)")
    real.add_argument("--rotten-tomatoes", action="store_true", help="issue 53's model and texts (see --models-dir)")
    real.add_argument(
        "--backbone",
        choices=("minilm", "mpnet", "all"),
        default="minilm",
        help="--rotten-tomatoes: the classifier fine-tuned from MiniLM-L6 (default) or MPNet-base (12 layers); all: "
        "one after the other, each its own section and result file",
    )
    real.add_argument("--model", type=Path, help="an `eek fit` folder, served by eek serve")
    real.add_argument("--plain", type=Path, help="the plain classifier with MODEL's weights (Infinity, full model)")
    real.add_argument(
        "--int8-model",
        type=Path,
        help="MODEL certified on the int8 base (`eek calibrate --dtype int8`), for `eek serve int8` (default: MODEL)",
    )
    real.add_argument("--texts", type=Path, help="one text per line (--rotten-tomatoes: the test split)")
    real.add_argument(
        "--calibration-texts",
        type=Path,
        help="one text per line, never among --texts: what OpenVINO int8 is quantized on (--rotten-tomatoes: the "
        f"first {CALIBRATION_TEXTS} of the validation split); without them that peer is skipped",
    )
    real.add_argument("--models-dir", type=Path, default=Path("bench-results/serve-peers"), help="--rotten-tomatoes")
    real.add_argument("--infinity-python", type=Path, default=None, help="default .venv-infinity/bin/python")
    real.add_argument(
        "--servers",
        nargs="+",
        choices=SERVERS,
        default=list(DEFAULT_SERVERS),
        metavar="SERVER",
        help=f"of {', '.join(SERVERS)} (default: all but the cohort engine's)",
    )
    real.add_argument("--max-batch-size", type=int, default=PeersConfig.max_batch_size)
    real.add_argument(
        "--texts-per-request",
        type=int,
        default=PeersConfig.texts_per_request,
        metavar="N",
        help="the corpus job after the concurrency levels: every text once, N texts a request (default: "
        f"{PeersConfig.texts_per_request}; 0: no corpus job)",
    )
    real.add_argument(
        "--corpus-concurrency",
        type=int,
        default=PeersConfig.corpus_concurrency,
        metavar="C",
        help=f"the corpus job's requests at a time (default: {PeersConfig.corpus_concurrency})",
    )
    real.add_argument("--server-cores", default=None, help='e.g. "0" (default: the first core; "none")')
    real.add_argument("--client-cores", default=None, help='e.g. "1" (default: the other cores; "none")')
    real.add_argument("--soak-seconds", type=float, default=PeersConfig.soak_seconds, help="0: no soak")
    real.add_argument("--soak-only", action="store_true", help="the soak alone (no server per concurrency)")
    real.add_argument(
        "--soak-memory-trim",
        default=None,
        metavar="SECONDS|off",
        help="the soak server's --memory-trim (default: eek serve's own)",
    )
    real.add_argument("--readme", type=Path, help="write the section into this Markdown file (docs/serving.md)")
    real.add_argument("--from-json", type=Path, help="render a recorded result, run nothing")


def _one_backbone(argv: list[str], backbone: str) -> list[str]:
    """``argv`` with its ``--backbone all`` (or ``--backbone=all``) naming ``backbone`` instead."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "all" and i > 0 and argv[i - 1] == "--backbone":
            arg = backbone
        elif arg == "--backbone=all":
            arg = f"--backbone={backbone}"
        out.append(arg)
    return out


def wanted(args) -> bool:
    return bool(args.rotten_tomatoes or args.model or args.from_json)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.suite.serve_peers_cli", description=__doc__.split("\n\n")[0]
    )
    add_level_arguments(parser)
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not wanted(args):
        parser.error("say what to serve: --rotten-tomatoes, --model MODEL --plain PLAIN --texts FILE, or --from-json")
    return _run(args, argv)


def _run(args, argv: list[str]) -> int:
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        if args.texts_per_request < 0 or args.texts_per_request == 1 or args.corpus_concurrency < 1:
            raise SystemExit(
                "error: --texts-per-request must be 0 (no corpus job) or >= 2 (one text a request is the concurrency "
                "levels'), and --corpus-concurrency >= 1"
            )
        if args.rotten_tomatoes and args.backbone == "all":
            for backbone in BACKBONES:  # each recorded with the command that measures it alone
                args.backbone = backbone
                _run(args, _one_backbone(argv, backbone))
            return 0
        calibration = None  # read where the OpenVINO peer runs (openvino installed), not before
        if args.calibration_texts is not None:
            calibration = functools.partial(_lines, args.calibration_texts)
        if args.rotten_tomatoes:
            model, plain, int8_model, texts, source = rotten_tomatoes(args.models_dir, args.backbone)
            if calibration is None:  # the validation split: what eek fit calibrated on, never the texts timed
                calibration = _validation_texts
        else:
            int8_model = args.int8_model
            if args.plain is None or args.texts is None:
                raise SystemExit("error: --model needs --plain and --texts (or use --rotten-tomatoes)")
            model, plain = args.model, args.plain
            texts = [line for line in args.texts.read_text().splitlines() if line.strip()]
            source = f"{args.model.name}, the {len(texts)} texts of {args.texts.name}"
        server_cores, client_cores = default_cores()
        config = PeersConfig(
            model=model,
            plain=plain,
            int8_model=int8_model,
            texts=texts,
            calibration_texts=calibration,
            source=source,
            concurrency=tuple(args.concurrency),
            requests=args.requests,
            max_seconds=args.max_seconds,
            max_batch_size=args.max_batch_size,
            server_cores=server_cores if args.server_cores is None else parse_cores(args.server_cores),
            client_cores=client_cores if args.client_cores is None else parse_cores(args.client_cores),
            servers=() if args.soak_only else tuple(args.servers),
            texts_per_request=args.texts_per_request,
            corpus_concurrency=args.corpus_concurrency,
            infinity_python=args.infinity_python,
            soak_seconds=args.soak_seconds,
            soak_memory_trim=args.soak_memory_trim,
            section="serve-peers"
            if not args.rotten_tomatoes or args.backbone == "minilm"
            else f"serve-peers-{args.backbone}",
        )
        output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="eek-serve-peers-"))
        command = "python -m benchmarks.suite.serve_peers_cli " + " ".join(argv)
        name = args.name
        if args.rotten_tomatoes and args.backbone != "minilm" and name == "cpu":
            name = f"{args.backbone}_cpu"  # beside the MiniLM result, not over it
        result = run(config, output_dir, name, command)
        print(f"written to {output_dir}")
    print(render(result))
    if args.readme:
        write_readme(args.readme, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
