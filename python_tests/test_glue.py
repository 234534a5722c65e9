"""GLUE loaders on tiny local files in GLUE's layouts, with a tiny tokenizer written here (no network)."""

import json

import pytest
import torch
from conftest import word_vocab

datasets = pytest.importorskip("datasets")

from earlyexit_kernels.training.glue import GLUE_TASKS, glue_batches, load_glue  # noqa: E402

WORDS = ["good", "bad", "movie", "the", "a", "is", "cat", "sat", "on", "mat", "not", "dog"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tok")
    word_vocab(folder, WORDS)
    return BertTokenizerFast.from_pretrained(str(folder))


def _ids(tokenizer, *words):
    return [tokenizer.convert_tokens_to_ids(w) for w in words]


def test_sst2_tsv_in_glue_layout(tmp_path, tokenizer):
    path = tmp_path / "dev.tsv"
    path.write_text('sentence\tlabel\nthe movie is good\t1\nthe "movie" is bad\t0\na movie\t1\n')
    ds = load_glue("SST-2", str(path), tokenizer, max_length=16)
    assert len(ds) == 3 and ds["labels"] == [1, 0, 1]
    cls, sep = _ids(tokenizer, "[CLS]", "[SEP]")
    assert ds[0]["input_ids"] == [cls, *_ids(tokenizer, "the", "movie", "is", "good"), sep]
    # GLUE's TSV files are read without quote processing: the quotes are kept as text
    assert tokenizer.unk_token_id in ds[1]["input_ids"]
    batches = glue_batches(ds, tokenizer, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 8]), torch.Size([1, 4])]
    assert batches[0]["labels"].dtype == torch.long and batches[0]["attention_mask"][0].tolist() == [1] * 6 + [0] * 2


def test_mrpc_original_tsv_columns(tmp_path, tokenizer):
    path = tmp_path / "msr_paraphrase_test.tsv"
    path.write_text("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tthe cat sat\tthe cat sat on the mat\n")
    ds = load_glue("mrpc", str(path), tokenizer)
    row = ds[0]
    assert row["labels"] == 1 and row["token_type_ids"].count(1) == 7  # second sentence + its [SEP]


def test_rte_csv_with_text_labels(tmp_path, tokenizer):
    path = tmp_path / "rte.csv"
    path.write_text(
        "idx,sentence1,sentence2,label\n0,the cat sat,a cat sat,entailment\n1,the dog,a cat,not_entailment\n"
    )
    ds = load_glue("rte", str(path), tokenizer)
    assert ds["labels"] == [0, 1] and GLUE_TASKS["rte"].num_labels == 2


def test_mnli_jsonl_drops_unlabelled_pairs(tmp_path, tokenizer):
    path = tmp_path / "mnli.jsonl"
    rows = [
        {"sentence1": "the cat sat", "sentence2": "a cat sat", "gold_label": "entailment"},
        {"sentence1": "the cat", "sentence2": "the dog", "gold_label": "contradiction"},
        {"sentence1": "the cat", "sentence2": "a mat", "gold_label": "-"},
        {"sentence1": "a dog", "sentence2": "a mat", "gold_label": "neutral"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_glue("mnli", str(path), tokenizer)
    assert ds["labels"] == [0, 2, 1]


def test_stsb_parquet_is_regression(tmp_path, tokenizer):
    path = tmp_path / "stsb.parquet"
    datasets.Dataset.from_dict(
        {"sentence1": ["the cat sat", "a dog"], "sentence2": ["the cat sat", "the mat"], "label": [5.0, 0.4]}
    ).to_parquet(str(path))
    ds = load_glue("stsb", str(path), tokenizer)
    assert ds["labels"] == pytest.approx([5.0, 0.4])
    assert GLUE_TASKS["stsb"].num_labels == 1
    batch = glue_batches(ds, tokenizer, batch_size=4)[0]
    assert batch["labels"].dtype == torch.float32


def test_loader_errors_name_the_problem(tmp_path, tokenizer):
    path = tmp_path / "x.tsv"
    path.write_text("text\tlabel\nthe cat\t1\n")
    with pytest.raises(ValueError, match="sentence"):
        load_glue("sst2", str(path), tokenizer)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        load_glue("cola-xl", str(path), tokenizer)
    with pytest.raises(FileNotFoundError):
        load_glue("sst2", str(tmp_path / "missing.tsv"), tokenizer)


def test_missing_datasets_raises_import_error_with_what_to_install(monkeypatch, tmp_path, tokenizer):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    path = tmp_path / "dev.tsv"
    path.write_text("sentence\tlabel\nthe cat\t1\n")
    with pytest.raises(ImportError, match="pip install datasets"):
        load_glue("sst2", str(path), tokenizer)
