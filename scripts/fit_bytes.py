"""What ``eek fit`` writes, as hashes: for a refactor of the fit pipeline that must leave its folders as they were
(issue 76 item 2).

``eek fit`` runs on five tiny-model variants (the tests' random word BERT, 300 rows): the default, ``--method
pabee``, unlabelled rows, ``--calibration FILE``, and uncertified with fixed heads, all at ``--seed 3``. Each
written file's SHA-256 goes to ``ROOT/hashes.json``; in ``eek_fit.json`` the timings, the drawn order seed (OS
entropy, by design) and the paths are left out first. Torch's generator is drawn from the operating system's
entropy before each fit, so a draw the fit makes outside ``--seed`` changes the hashes. Run it on two commits with the same ROOT and compare::

    python scripts/fit_bytes.py /tmp/fit-bytes && cp /tmp/fit-bytes/hashes.json before.json && rm -r /tmp/fit-bytes
    git checkout OTHER && python scripts/fit_bytes.py /tmp/fit-bytes && cmp before.json /tmp/fit-bytes/hashes.json
"""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

ROOT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT_DIR / "python_tests"))  # the tests' tiny model: conftest.word_bert
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from conftest import word_bert, word_texts  # noqa: E402

from earlyexit_kernels.integrations.cli import main  # noqa: E402

torch.set_num_threads(1)


def _label(text: str) -> str:
    words = text.split()
    first = sum(int(w[1:]) < 30 for w in words)
    return "pos" if 2 * first > len(words) else "neg"


def _frame(count: int, seed: int, labelled: bool = True):
    texts = [t or "w1" for t in word_texts(count, seed=seed, longest=20)]
    frame = pd.DataFrame({"text": texts})
    if labelled:
        frame["label"] = [_label(t) for t in texts]
    return frame


def _without_timings(value):
    """``eek_fit.json`` less what differs between two runs of the same commit."""
    if isinstance(value, dict):
        return {
            k: _without_timings(v)
            for k, v in value.items()
            if "second" not in k and "time" not in k and k not in ("order_seed", "source_model", "calibration_source")
        }
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    if isinstance(value, str):
        return re.sub(r"[0-9.]+ ?s\b", "T", value)  # a stage's seconds
    return value


def main_() -> None:
    root = Path(sys.argv[1])
    plain = root / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    model, tokenizer = word_bert(plain, 2, labels={0: "neg", 1: "pos"})
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    _frame(300, 1).to_csv(root / "train.csv", index=False)
    _frame(300, 1, labelled=False).to_csv(root / "train_unlabelled.csv", index=False)
    _frame(200, 2).to_csv(root / "cal.csv", index=False)
    variants = {
        "default": [root / "train.csv"],
        "pabee": [root / "train.csv", "--method", "pabee", "--epochs", "1"],
        "unlabelled": [root / "train_unlabelled.csv"],
        "calibration": [root / "train.csv", "--calibration", root / "cal.csv"],
        "uncertified": [root / "train.csv", "--confidence", "none", "--pooling", "cls", "--head", "model"],
    }
    found = {}
    for name, args in variants.items():
        out = root / f"out-{name}"
        command = ["fit", plain, *args, out, "--no-progress", "--seed", "3", "--max-drop", "10"]
        # torch's generator as --seed does not fix it: a draw of the fit made outside its seed then shows
        torch.manual_seed(int.from_bytes(os.urandom(8), "little"))
        status = main([str(a) for a in command])
        files = {}
        for path in sorted(out.iterdir()) if status == 0 else []:
            data = path.read_bytes()
            if path.name == "eek_fit.json":
                data = json.dumps(_without_timings(json.loads(data)), sort_keys=True).encode()
            files[path.name] = hashlib.sha256(data).hexdigest()
        found[name] = {"status": status, "files": files}
    (root / "hashes.json").write_text(json.dumps(found, indent=1))
    print(json.dumps({name: (v["status"], len(v["files"])) for name, v in found.items()}))


if __name__ == "__main__":
    main_()
