"""Which Linear layers a fine-tuned encoder can take in dynamic int8: accuracy with one kind kept float.

Finished investigation: MPNet needs its feed-forward output projections in float under int8 (86.09% kept float
against 73.91% all int8) (docs/benchmarks.md, "Early exit with int8, bf16 and torch.compile: MPNet-base").

The first N Rotten Tomatoes test texts (the stack benchmark's length-sorted batches of 32) through
a fine-tuned classifier folder: float32; every encoder Linear int8 (``quantize_dynamic``, one scale
per tensor); per-channel weight scales; and every encoder Linear int8 but one kind (feed-forward
output projections, first feed-forward Linears, attention outputs, value projections), by the
suffix of the module's name. The figures in docs/benchmarks.md (MPNet-base stack section) came from

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/int8_linear_sensitivity.py .cache/mpnet-rt-99bf4a38db09 640
"""

import copy
import sys
import time

import torch
from torch import nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from earlyexit_kernels.demo.real_task import load_rotten_tomatoes, tokenize

#: an MPNet layer's Linear layers by the suffix of their names
KINDS = {
    "feed-forward output": "output.dense",
    "first feed-forward": "intermediate.dense",
    "attention output": "attn.o",
    "value": "attn.v",
}


def main(folder: str, count: int) -> None:
    torch.set_num_threads(2)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    test = load_rotten_tomatoes(0)["test"]
    order = sorted(range(count), key=lambda i: len(test.texts[i]))
    batches = [
        (
            tokenize(tokenizer, [test.texts[i] for i in order[s : s + 32]], 128),
            torch.tensor([test.labels[i] for i in order[s : s + 32]]),
        )
        for s in range(0, count, 32)
    ]

    def accuracy(candidate) -> tuple[float, float]:
        right, start = 0, time.perf_counter()
        with torch.inference_mode():
            for batch, labels in batches:
                right += int((candidate(**batch).logits.argmax(-1) == labels).sum())
        return right / count, time.perf_counter() - start

    def quantized(spec):
        copied = copy.deepcopy(model)
        torch.ao.quantization.quantize_dynamic(copied.base_model.encoder, spec, dtype=torch.qint8, inplace=True)
        return copied

    names = [n for n, m in model.base_model.encoder.named_modules() if isinstance(m, nn.Linear)]
    runs = {
        "float32": lambda: model,
        "every Linear int8": lambda: quantized({nn.Linear}),
        "every Linear int8, per-channel weights": lambda: quantized({nn.Linear: per_channel_dynamic_qconfig}),
    }
    for kind, suffix in KINDS.items():
        spec = {n: default_dynamic_qconfig for n in names if not n.endswith(suffix)}
        runs[f"int8 but the {kind} Linears float ({len(names) - len(spec)})"] = lambda spec=spec: quantized(spec)
    print(f"{folder}, the first {count} test texts")
    for name, make in runs.items():
        right, seconds = accuracy(make())
        print(f"{name:<55} {100 * right:6.2f}%  {seconds:5.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 640)
