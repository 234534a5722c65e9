"""How much the unpatched model's own logits move when the batch around a row changes.

Finished investigation: the unpatched model moves its own logits by up to 1.4e-6 (a batch of 32 against its
last 16 rows) and 3.1e-6 (a row alone) (docs/usage.md, "Supported models", exact up to rounding).

The reference for "exact up to rounding" once rows leave a batch (docs/usage.md): the
fine-tuned MiniLM-L6 of the real-task demo (``make demo`` caches it), Rotten Tomatoes test
rows in length-sorted batches of 32; each batch's last 16 rows are run again as a batch of
their own (padding trimmed to their longest), and every 10th batch's longest row alone.

    flock -x /tmp/eek-cpu.lock .venv/bin/python benchmarks/archive/batch_rounding.py --threads 2
"""

import argparse

import torch

from earlyexit_kernels.demo import real_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = real_task.fine_tuned_minilm(progress=False)
    test = real_task.load_rotten_tomatoes()["test"]
    order = sorted(range(len(test)), key=lambda i: len(tokenizer(test.texts[i])["input_ids"]))
    worst_half = worst_alone = 0.0
    rows_seen = 0
    with torch.inference_mode():
        for batch, start in enumerate(range(0, len(order) - 31, 32)):
            texts = [test.texts[i] for i in order[start : start + 32]]
            full = model(**real_task.tokenize(tokenizer, texts)).logits
            half = model(**real_task.tokenize(tokenizer, texts[16:])).logits
            worst_half = max(worst_half, (full[16:] - half).abs().max().item())
            if batch % 10 == 0:
                alone = model(**real_task.tokenize(tokenizer, texts[-1:])).logits
                worst_alone = max(worst_alone, (full[-1:] - alone).abs().max().item())
            rows_seen += len(texts)
    print(
        f"{rows_seen} rows, {args.threads} threads: a batch of 32 vs its last 16 rows, max |diff| {worst_half:.3g}; "
        f"the longest row vs alone (every 10th batch), max |diff| {worst_alone:.3g}"
    )


if __name__ == "__main__":
    main()
