"""Every ```python block of the README and of docs/ runs as written, on a small random model built offline.

The documents say what their snippets assume (README "Use", docs/usage.md "Patch a model"): ``path`` is a folder with a
sequence classifier and its tokenizer, ``ids``/``mask`` a tokenized batch, ``texts`` a list of
strings, ``batches``/``val_batches`` lists of dicts with ``input_ids``, ``attention_mask`` and
``labels``. :data:`PREAMBLES` builds exactly those names (and ``model`` where a section goes on
from an earlier block) for each section: a 4-layer BERT with hidden size 32 and a 40-word
WordPiece tokenizer, saved in ``tmp_path``. Each block runs in ``tmp_path`` (so files the
snippets write, such as ``"out"`` or ``"curve.png"``, land there) in a fresh namespace.
Blocks that need a GPU, a Ray cluster or the Hugging Face Hub are skipped with the reason;
a block in a section this file does not know fails, so a new snippet gets a preamble.
Blocks are named by document, section heading and ordinal in the section.
"""

import re
from pathlib import Path

import pytest
import torch
from conftest import word_bert

REPOSITORY = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
WORDS = "good bad great awful fine movie film plot actor scene not very really the a is was and but it".split()


def _blocks(document: Path):
    """``(document, section, ordinal in the section, code)`` of every ```python block of ``document``, in order."""
    name = str(document.relative_to(REPOSITORY))
    section, counts, blocks = None, {}, []
    lines = document.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"^#{2,4} (.+)$", line)
        if heading:
            section = heading.group(1).strip()
        if line.strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            ordinal = counts.get(section, 0)
            counts[section] = ordinal + 1
            blocks.append((name, section, ordinal, "\n".join(lines[i + 1 : end])))
            i = end
        i += 1
    return blocks


def _save_plain_model(folder: Path):
    """A 4-layer random BERT classifier (2 labels) and a WordPiece tokenizer, as ``save_pretrained`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    model, tokenizer = word_bert(folder, 2, words=WORDS)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return tokenizer


def _texts(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (count,), generator=generator).tolist()
    return [
        " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=generator).tolist()) for n in lengths
    ]


def _batches(tokenizer, count, seed):
    out = []
    for k in range(count):
        encoded = tokenizer(_texts(8, seed=seed + k), padding=True, return_tensors="pt")
        out.append(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": torch.tensor([0, 1] * 4),
            }
        )
    return out


def _common(tmp_path):
    """The names the snippets assume (README "Use", docs/usage.md "Patch a model")."""
    import earlyexit_kernels as eek

    path = str(tmp_path / "model")
    tokenizer = _save_plain_model(Path(path))
    texts = _texts(24)
    encoded = tokenizer(texts[:6], padding=True, return_tensors="pt")
    return {
        "eek": eek,
        "torch": torch,
        "path": path,
        "tokenizer": tokenizer,
        "texts": texts,
        "ids": encoded["input_ids"],
        "mask": encoded["attention_mask"],
        "batches": _batches(tokenizer, 2, seed=1),
        "val_batches": _batches(tokenizer, 3, seed=10),
    }


def _patched_model(ns, policy=None):
    """What an earlier block of the section left in ``model``: the plain model, patched."""
    from transformers import AutoModelForSequenceClassification

    eek = ns["eek"]
    model = AutoModelForSequenceClassification.from_pretrained(ns["path"], attn_implementation="sdpa").eval()
    return eek.patch(model, policy or eek.Entropy(0.3), backend="torch")


def _with_model(ns):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ns.update(AutoModelForSequenceClassification=AutoModelForSequenceClassification, AutoTokenizer=AutoTokenizer)
    ns["model"] = _patched_model(ns)


def _calibration_rows(ns):
    """A patched model and 320 calibration rows: enough to certify a 1-point budget at 95% (299 at least)."""
    from earlyexit_kernels.training.calibrate_model import calibrate

    _with_model(ns)
    ns["calibrate"] = calibrate
    ns["calibration_batches"] = _batches(ns["tokenizer"], 40, seed=20)


def _trainer(ns):
    from transformers import Trainer, TrainingArguments

    ns["model"] = _patched_model(ns, ns["eek"].Patience(2))
    ns["Trainer"] = Trainer
    ns["args"] = TrainingArguments(
        output_dir="trainer", max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no"
    )
    ns["train"] = [
        {"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i], "labels": b["labels"][i]}
        for b in ns["batches"]
        for i in range(len(b["labels"]))
    ]


def _glue(ns):
    folder = Path("SST-2")
    folder.mkdir()
    rows = [f"{text}\t{k % 2}" for k, text in enumerate(ns["texts"][:10])]
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")


def _gpu(ns):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _skip(reason):
    def preamble(ns):
        pytest.skip(reason)

    return preamble


#: blocks the suite cannot run on a machine without the Hub, a cluster or storage: why, and what runs instead
NOT_RUN = {
    ("docs/usage.md", "Backend, outputs, the Hub and devices", 1): (
        "needs the Hugging Face Hub; the same resolution runs offline on a local Hub cache in "
        "test_from_pretrained_hub.py"
    ),
    (
        "docs/serving.md",
        "On a Ray cluster",
        0,
    ): "needs a Ray cluster and S3 storage; python_tests/test_ray.py runs a local Ray",
}
#: blocks that run only where a CUDA GPU is (skipped elsewhere)
ON_A_GPU = {("docs/usage.md", "Backend, outputs, the Hub and devices", 2)}

#: (section, ordinal) -> what the block needs beyond the common names, or why it is skipped
PREAMBLES = {
    ("README.md", "Use", 0): lambda ns: None,  # loads the model itself from ``path``
    ("docs/usage.md", "Patch a model", 0): lambda ns: None,
    ("docs/usage.md", "Backend, outputs, the Hub and devices", 0): lambda ns: None,
    ("docs/usage.md", "Exit heads: pooling and form", 0): lambda ns: None,
    ("docs/usage.md", "Save and load", 0): _with_model,
    ("docs/usage.md", "Backends", 0): lambda ns: None,
    ("docs/usage.md", "Combining with int8, bf16 and torch.compile", 0): _with_model,
    ("docs/serving.md", "Many sequences: `eek.classify` and the continuous engine", 0): _with_model,
    ("docs/training.md", "Fit in one call", 0): _with_model,
    ("docs/training.md", "Fit in one call", 1): _with_model,
    ("docs/training.md", "Fit in one call", 2): _with_model,
    ("docs/training.md", "Training the heads", 0): _with_model,
    ("docs/training.md", "Training the heads", 1): _trainer,
    ("docs/training.md", "Calibration", 0): _with_model,
    ("docs/training.md", "Calibration with a guarantee", 0): _calibration_rows,
    ("docs/training.md", "Calibration with a guarantee", 1): _calibration_rows,
    ("docs/training.md", "GLUE from local files", 0): _glue,
    **{block: _skip(reason) for block, reason in NOT_RUN.items()},
    **{block: _gpu for block in ON_A_GPU},
}

BLOCKS = [block for document in DOCUMENTS for block in _blocks(document)]


def test_every_block_has_a_preamble():
    known = {(document, section, ordinal) for document, section, ordinal, _ in BLOCKS}
    assert known == set(PREAMBLES), "add the new block to PREAMBLES (or drop the stale entry)"


ORDINALS = ("first", "second", "third", "fourth")


def test_the_index_names_exactly_the_blocks_the_suite_does_not_run_on_a_cpu():
    """docs/index.md lists them as ``- DOCUMENT, "SECTION"[, its ORDINAL block]: why``."""
    statement = (REPOSITORY / "docs" / "index.md").read_text().split("Every Python block")[1]
    listed = {
        (f"docs/{document}", section, ORDINALS.index(ordinal) if ordinal else 0)
        for document, section, ordinal in re.findall(
            r'^- (\w+\.md), "([^"]+)"(?:, its (\w+) block)?:', statement, flags=re.M
        )
    }
    assert listed == set(NOT_RUN) | ON_A_GPU


@pytest.mark.parametrize(
    ("document", "section", "ordinal", "code"), BLOCKS, ids=[f"{d}-{s}-{o}" for d, s, o, _ in BLOCKS]
)
def test_block_runs(document, section, ordinal, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if (document, section, ordinal) not in PREAMBLES:
        pytest.fail(f"{document}: block {ordinal} of section {section!r} has no preamble in this file")
    ns = _common(tmp_path)
    PREAMBLES[(document, section, ordinal)](ns)
    exec(compile(code, f"{document}[{section}#{ordinal}]", "exec"), ns)  # noqa: S102 - the point of the test


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_what_the_readme_says_of_hidden_states_and_attentions(flag, tmp_path):
    """docs/usage.md, "Backend, outputs, the Hub and devices": these flags raise ValueError on a patched model, and unpatch gives them back."""
    ns = _common(tmp_path)
    model = _patched_model(ns)
    with pytest.raises(ValueError, match=f"{flag}=True is not available with early exit"):
        model(input_ids=ns["ids"], attention_mask=ns["mask"], **{flag: True})
    ns["eek"].unpatch(model)
    out = model(input_ids=ns["ids"], attention_mask=ns["mask"], **{flag: True})
    if flag == "output_hidden_states":
        assert len(out.hidden_states) == 5  # the embeddings and 4 layers
