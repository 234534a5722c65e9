"""``eek fit --rewrites N``: rewritten copies of the training rows train the heads, labelled by the full model.

A copy drops some words, keeps a span, or joins a row's first half to another training row's second half; only rows
that train the heads are rewritten (never a validation or calibration row), and a copy's label is the full model's
class on the copy itself.
"""

import json
import random

import pytest
import torch
from conftest import word_bert, word_texts, write_table

import earlyexit_kernels as eek
from earlyexit_kernels.integrations.cli import main
from earlyexit_kernels.methods.policies import Entropy
from earlyexit_kernels.training.fit_config import FitConfig
from earlyexit_kernels.training.fit_texts import prepare
from earlyexit_kernels.training.labelled_texts import LabelledTexts, encode
from earlyexit_kernels.training.rewritten_rows import full_model_classes, rewrite, rewritten_texts

pd = pytest.importorskip("pandas", reason="the data files are written with pandas")
pytest.importorskip("pyarrow", reason="the command line reads tables through pyarrow")

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = {0: "neg", 1: "pos"}
TEN = " ".join(f"a{i}" for i in range(10))
OTHER = " ".join(f"b{i}" for i in range(8))


def _kinds(seed_count: int = 300):
    """Each seed's copy of TEN, sorted by what it is: a subsequence, a span, or TEN's first half and OTHER's second."""
    words, others = TEN.split(), OTHER.split()
    kinds = {"span": 0, "drop": 0, "join": 0}
    for seed in range(seed_count):
        copy = rewrite(TEN, OTHER, random.Random(seed)).split()
        if copy == words[:5] + others[4:]:
            kinds["join"] += 1
            continue
        assert all(word in words for word in copy), copy
        start = words.index(copy[0])
        if copy == words[start : start + len(copy)] and 5 <= len(copy) <= 9:
            kinds["span"] += 1
        else:
            assert copy == [w for w in words if w in copy], copy  # the words kept, in their order
            assert 1 <= len(words) - len(copy) <= 3, copy  # 10-25% of 10 words, one at least
            kinds["drop"] += 1
    return kinds


def test_a_copy_drops_words_keeps_a_span_or_joins_two_rows_halves():
    kinds = _kinds()
    assert all(count > 60 for count in kinds.values()), kinds  # each about a third of 300


def test_rows_of_fewer_than_four_words_are_copied_as_they_are():
    assert rewrite("one two three", OTHER, random.Random(0)) == "one two three"
    assert rewrite("", OTHER, random.Random(0)) == ""


def test_the_copies_come_copy_by_copy_and_are_fixed_by_their_seed():
    texts = [f"{TEN} r{i}" for i in range(5)]
    copies = rewritten_texts(texts, 3, seed=7)
    assert len(copies) == 15
    assert copies == rewritten_texts(texts, 3, seed=7)
    assert copies != rewritten_texts(texts, 3, seed=8)
    every_word = set(" ".join(texts).split())
    assert all(set(copy.split()) <= every_word for copy in copies)  # nothing but the rows' own words
    assert rewritten_texts(texts, 0, seed=7) == [] and rewritten_texts([], 3, seed=7) == []


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain")
    model, tokenizer = word_bert(path, 2, labels=LABELS)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), model, tokenizer


def test_the_full_model_s_class_on_each_row_in_the_rows_order(classifier):
    _, plain, tokenizer = classifier
    texts = [t or "w1" for t in word_texts(70, seed=5, longest=25)]
    encoded = encode(tokenizer, LabelledTexts(texts, None, None, "rows"), 64)
    patched = eek.patch(plain.__class__.from_pretrained(classifier[0]).eval(), Entropy(0.0))
    classes = full_model_classes(patched, encoded)
    with torch.no_grad():
        one_by_one = [int(plain(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts]
    assert classes.tolist() == one_by_one


def _rows(words: list[str], count: int, seed: int, labels: bool = True) -> LabelledTexts:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(count)]
    return LabelledTexts(texts, None, [LABELS[i % 2] for i in range(count)] if labels else None, "rows")


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_only_the_rows_that_train_the_heads_are_rewritten_and_the_full_model_labels_them(classifier, labelled):
    path, plain, tokenizer = classifier
    # the training rows use the first half of the vocabulary, the validation and calibration rows the second: a copy
    # holding a word of the second half would be a copy of a row that trains no head
    train = _rows([f"w{i}" for i in range(30)], 60, seed=1, labels=labelled)
    validation = _rows([f"w{i}" for i in range(30, 60)], 20, seed=2, labels=labelled)
    calibration = _rows([f"w{i}" for i in range(30, 60)], 20, seed=3, labels=labelled)
    model = eek.patch(plain.__class__.from_pretrained(path).eval(), Entropy(0.0))
    config = FitConfig(rewrites=2, confidence=None)
    data = prepare(model, tokenizer, train, validation, config, calibration=calibration)
    assert len(data.rewritten.input_ids) == 120
    first_half = set(tokenizer.convert_tokens_to_ids([f"w{i}" for i in range(30)])) | {
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
    }
    assert all(set(ids) <= first_half for ids in data.rewritten.input_ids)

    joined = data.with_rewritten(model)
    assert len(joined.train.input_ids) == 180 and joined.rewritten_rows == 120
    assert joined.train.input_ids[60:] == data.rewritten.input_ids
    assert joined.validation is data.validation and joined.calibration is data.calibration
    if labelled:
        assert torch.equal(joined.train_labels[:60], data.train_labels)
        assert torch.equal(joined.train_labels[60:], full_model_classes(model, data.rewritten))
        assert 0.0 <= joined.rewritten_kept_label <= 1.0
        assert "of them kept their row's label" in joined.describe_rewritten(2)
    else:
        assert joined.train_labels is None and joined.rewritten_kept_label is None
        assert joined.describe_rewritten(2).endswith("labelled by the full model")


def test_without_rewrites_the_rows_are_the_user_s(classifier):
    path, plain, tokenizer = classifier
    model = eek.patch(plain.__class__.from_pretrained(path).eval(), Entropy(0.0))
    data = prepare(model, tokenizer, _rows(["w1", "w2"], 30, 1), _rows(["w3"], 10, 2), FitConfig(confidence=None))
    assert data.rewritten is None and data.with_rewritten(model) is data and data.describe_rewritten(0) is None


def _frame(count: int, seed: int):
    texts = [t or "w1" for t in word_texts(count, seed=seed, longest=20)]
    return pd.DataFrame({"text": texts, "label": [LABELS[len(t.split()) % 2] for t in texts]})


def test_eek_fit_trains_on_the_copies_and_says_so(classifier, tmp_path, capsys):
    train = write_table(_frame(100, seed=1), tmp_path / "train.csv")
    out = tmp_path / "fitted"
    argv = [
        "fit",
        classifier[0],
        train,
        out,
        "--rewrites",
        "2",
        "--epochs",
        "2",
        "--no-progress",
        "--confidence",
        "off",
    ]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    assert "on 90 rows and calibrated them on 10 validation rows" in printed
    assert "the heads also trained on 180 rewritten copies of the training rows (--rewrites 2)" in printed
    summary = json.loads((out / "eek_fit.json").read_text())
    assert summary["train_rows"] == 90 and summary["rewritten_rows"] == 180


def test_pairs_are_refused_with_the_way_out(classifier, tmp_path, capsys):
    frame = _frame(40, seed=1)
    frame["second"] = frame["text"]
    train = write_table(frame, tmp_path / "train.csv")
    argv = [
        "fit",
        classifier[0],
        train,
        tmp_path / "out",
        "--pair-column",
        "second",
        "--rewrites",
        "1",
        "--no-progress",
    ]
    assert main([str(a) for a in argv]) == 2
    assert "--rewrites rewrites single texts, and the training rows are pairs" in capsys.readouterr().err
