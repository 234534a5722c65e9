"""The package's int8 model on two CPUs: are its logits the same where its form is the same?

The int8 form follows the CPU's class (:mod:`earlyexit_kernels.engine.layers.int8_isa`): 7-bit weights wherever the
GEMMs lack VNNI, so that no 16-bit pair sum saturates and the integer products are exact on every kernel. Then
an AVX2-only CPU should give what a VNNI CPU running the same 7-bit form gives, up to float rounding, and its
agreement with float32 should be that CPU's. Full-depth agreement on an emulated CPU is out of reach (the
emulator runs float SIMD in software: hours for 600 texts), so this compares the logits themselves, on a few
texts: ``--write`` runs the package's int8 model (``int8_encoder``, the family's recipe in this process's form)
on the first ``--count`` Rotten Tomatoes test texts and writes its logits (``--with-float``: the float32 model's
too, slow under an emulator); ``--compare`` reads two such files, and where one holds float32 logits, gives each
file's agreement with the float32 model's labels.

On a VNNI machine, the 7-bit form with fbgemm capped (the class follows the cap; ONNX Runtime then runs its
VNNI kernel on that form), and on the same machine an emulated AMD Zen 2 (``qemu-x86_64 -cpu EPYC-Rome``, where
every library's CPUID says AVX2: ONNX Runtime's and fbgemm's AVX2 kernels)::

    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/micro/int8_across_cpus.py FOLDER --write vnni.json --with-float
    qemu-x86_64 -cpu EPYC-Rome .venv/bin/python benchmarks/micro/int8_across_cpus.py FOLDER --write zen2.json
    python benchmarks/micro/int8_across_cpus.py --compare vnni.json zen2.json
"""

import argparse
import json
import os
import platform
import sys
import warnings

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from int8_recipes import batches  # noqa: E402

from earlyexit_kernels.demo.real_task import load_rotten_tomatoes  # noqa: E402
from earlyexit_kernels.engine.layers.int8_isa import FBGEMM_CAP, int8_isa, int8_weight_bits  # noqa: E402
from earlyexit_kernels.engine.layers.precision import int8_encoder, int8_recipe  # noqa: E402

warnings.filterwarnings("ignore", message=r".*(quantize_per_tensor|torch\.ao\.quantization).*")


def write(folder: str, count: int, out: str, with_float: bool) -> None:
    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = batches(tokenizer, load_rotten_tomatoes(0)["test"], count)
    recipe = int8_recipe(model)
    reference = None
    if with_float:
        with torch.inference_mode():
            reference = torch.cat([model(**batch).logits for batch, _ in data]).tolist()
    quantized = int8_encoder(model, inplace=True)
    with torch.inference_mode():
        logits = torch.cat([quantized(**batch).logits for batch, _ in data])
    record = {
        "folder": folder,
        "count": count,
        "recipe": recipe,
        "int8_class": int8_isa(),
        "weight_bits": int8_weight_bits(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "fbgemm_cap": os.environ.get(FBGEMM_CAP),
        "emulated_cpu": os.environ.get("QEMU_CPU"),
        "machine": platform.machine(),
        "logits": logits.tolist(),
        "float32_logits": reference,
    }
    with open(out, "w") as file:
        json.dump(record, file)
    print(f"{out}: {count} texts, recipe {recipe}, int8 class {record['int8_class']} ({record['weight_bits']}-bit "
          f"weights), torch's kernels {record['torch_capability']}, {FBGEMM_CAP}={record['fbgemm_cap']}, "
          f"emulated CPU {record['emulated_cpu']}")  # fmt: skip


def compare(first: str, second: str) -> None:
    a, b = (json.load(open(path)) for path in (first, second))
    for record, path in ((a, first), (b, second)):
        print(f"{path}: recipe {record['recipe']}, int8 class {record['int8_class']} ({record['weight_bits']}-bit "
              f"weights), torch's kernels {record['torch_capability']}, {FBGEMM_CAP}={record['fbgemm_cap']}, "
              f"emulated CPU {record['emulated_cpu']}")  # fmt: skip
    left, right = torch.tensor(a["logits"]), torch.tensor(b["logits"])
    if left.shape != right.shape:
        raise SystemExit(f"the files hold logits of other shapes: {tuple(left.shape)} and {tuple(right.shape)}")
    floats = [record["float32_logits"] for record in (a, b) if record.get("float32_logits") is not None]
    if floats:
        labels = torch.tensor(floats[0]).argmax(-1)
        for record, path in ((a, first), (b, second)):
            agree = float((torch.tensor(record["logits"]).argmax(-1) == labels).float().mean())
            print(f"{path}: agreement with the float32 model (its labels from {'this' if record.get('float32_logits') is not None else 'the other'} file) {100 * agree:.2f}%")  # fmt: skip
    difference = (left - right).abs()
    labels = int((left.argmax(-1) != right.argmax(-1)).sum())
    spread = float((left[:, 0] - left[:, -1]).abs().median())
    print(f"{len(left)} texts: largest logit difference {float(difference.max()):.3g}, median {float(difference.median()):.3g} "
          f"(the median margin between the first and last logit: {spread:.3g}); labels that differ: {labels}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a fine-tuned sequence classifier folder (with --write)")
    parser.add_argument("--count", type=int, default=64, help="the first N Rotten Tomatoes test texts")
    parser.add_argument("--write", metavar="FILE", help="write the int8 model's logits here")
    parser.add_argument("--with-float", action="store_true", help="--write: the float32 model's logits too")
    parser.add_argument("--compare", nargs=2, metavar="FILE", help="two files --write wrote")
    args = parser.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.write and args.folder:
        write(args.folder, args.count, args.write, args.with_float)
    else:
        parser.error("give FOLDER --write FILE, or --compare FILE FILE")


if __name__ == "__main__":
    main()
