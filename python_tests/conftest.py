"""Shared fixtures: tiny random BERT, ALBERT and RoBERTa classifiers and their inputs."""

import copy
import dataclasses
import os
from pathlib import Path

import torch

# Triton kernels run in Triton's interpreter when there is no GPU; this must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (scripts/run_tests.sh) each worker takes its share of the cores as torch threads.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from earlyexit_kernels.backends.write_back import WriteBack  # noqa: E402

VOCAB = 97
ARCHITECTURES = ("bert", "albert", "roberta")
#: the sizes every tiny random model of the tests shares (conftest's and test_model_families' families)
TINY_SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, max_position_embeddings=64)


def tiny_model(
    arch: str = "bert", *, num_labels: int = 3, num_layers: int = 4, attn: str = "eager", seed: int = 0, **config
):
    """A small random sequence classifier in eval mode (hidden 32, 2 heads); ``config`` adds to its config."""
    torch.manual_seed(seed)
    common = dict(**TINY_SIZES, num_hidden_layers=num_layers, intermediate_size=64, num_labels=num_labels, **config)
    common.setdefault("hidden_dropout_prob", 0.0)
    common.setdefault("attention_probs_dropout_prob", 0.0)
    if arch == "bert":
        model = BertForSequenceClassification._from_config(BertConfig(**common), attn_implementation=attn)
    elif arch == "albert":
        config = AlbertConfig(embedding_size=16, num_hidden_groups=2, classifier_dropout_prob=0.0, **common)
        model = AlbertForSequenceClassification._from_config(config, attn_implementation=attn)
    elif arch == "roberta":
        config = RobertaConfig(pad_token_id=1, **common)
        model = RobertaForSequenceClassification._from_config(config, attn_implementation=attn)
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_mpnet(num_layers: int = 2, seed: int = 0, **config):
    """A small random MPNet classifier in eval mode (hidden 32, 2 heads, 2 labels); ``config`` overrides the rest
    (``vocab_size``, ``max_position_embeddings``, ``pad_token_id``, ...)."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(seed)
    config = MPNetConfig(
        **{
            "vocab_size": 50,
            "hidden_size": 32,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "num_labels": 2,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            **config,
        }
    )
    return MPNetForSequenceClassification(config).eval()


def mlp_head_model(seed: int, num_layers: int = 4):
    """:func:`tiny_model` patched with mean-pooled MLP exit heads (what ``eek fit`` trains by
    default) of random weights whose predictions differ from layer to layer; torch backend,
    ``Entropy(0.0)``: patch again with the policy and backend under test."""
    import earlyexit_kernels as eek

    model = tiny_model("bert", num_layers=num_layers, seed=seed)
    eek.patch(model, eek.Entropy(0.0), backend="torch", pooling="mean", head="mlp")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.early_exit_heads.classifiers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def tiny_batch(batch: int = 6, seq_len: int = 12, *, seed: int = 1, padded: bool = True):
    """Random ids, a right-padded mask (row 0 always full length) and token types."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq_len), generator=generator)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if padded:
        lengths = torch.randint(2, seq_len + 1, (batch,), generator=generator)
        lengths[0] = seq_len
        mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    token_types = torch.randint(0, 2, (batch, seq_len), generator=generator)
    return ids, mask, token_types


@pytest.fixture(params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(autouse=True)
def _end_a_worker_whose_cuda_context_broke():
    """Under pytest-xdist on a GPU: a CUDA error that sticks (a kernel's ``__trap()`` on a bad
    index) would fail every later test of this worker; the worker ends instead, its test is
    reported as crashed, and pytest-xdist starts a fresh worker for the rest."""
    yield
    if "PYTEST_XDIST_WORKER" in os.environ and torch.cuda.is_available() and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
        except RuntimeError as err:
            print(f"CUDA context broken ({err}); ending this worker", flush=True)
            os._exit(70)


# The Triton kernels' tests build their inputs on the CPU. Where there is a GPU the
# kernels run natively on it; under the interpreter they run on the CPU tensors as is.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Compiled for a GPU, Triton lowers fp32 exp and log to ex2.approx / lg2.approx (about 2 ulp, and
# exp's argument is first scaled by log2(e), which costs |x| * 2^-24 relatively), x / y to
# div.full.f32 (2 ulp), and contracts a * b + c into FMAs; the interpreter computes with NumPy's
# correctly rounded functions and no contraction. Tests that hold the interpreter to a few ulps
# widen their bounds by this flag (each says by how much and why).
TRITON_COMPILED = KERNEL_DEVICE.type == "cuda"


def backend_device(backend: str) -> torch.device:
    """Where a test's model runs on ``backend``: compiled Triton takes CUDA tensors only, so the
    triton backend's model goes to the GPU where there is one; every other backend stays on the CPU."""
    return KERNEL_DEVICE if backend == "triton" else torch.device("cpu")


def _moved(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        base = value._base
        if base is not None and base.is_contiguous() and base.storage_offset() == 0 and value.device != device:
            # Keep a strided view strided: move its buffer, then take the same view of it.
            return base.to(device).as_strided(value.shape, value.stride(), value.storage_offset())
        return value.to(device)
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value).to(device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # FusedExitHead and other weight holders
        fields = [f for f in dataclasses.fields(value) if f.init]
        return dataclasses.replace(value, **{f.name: _moved(getattr(value, f.name), device) for f in fields})
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # WriteBack and other named tuples
        return type(value)(*(_moved(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def on_kernel_device(fn):
    """``fn`` run on KERNEL_DEVICE, see :func:`on_device`."""
    return on_device(fn, KERNEL_DEVICE)


def on_device(fn, device: torch.device):
    """``fn`` run on ``device``: tensor (and module) arguments go there, results come back
    to the CPU, and the buffers of a ``WriteBack`` argument, written in place, are copied back.
    Views keep their strides."""
    if device.type == "cpu":
        return fn

    def call(*args, **kwargs):
        moved_args, moved_kwargs = _moved(args, device), _moved(kwargs, device)
        result = fn(*moved_args, **moved_kwargs)
        for original, moved in zip((*args, *kwargs.values()), (*moved_args, *moved_kwargs.values())):
            if isinstance(original, WriteBack):
                for buffer, written in zip(original[3:], moved[3:]):
                    if buffer._base is not None and written._base is not None:
                        buffer._base.copy_(written._base)  # all of the buffer the view lies in
                    else:
                        buffer.copy_(written)
        return _moved(result, torch.device("cpu"))

    return call


WORDS = [f"w{i}" for i in range(60)]


def word_texts(count, seed=0, longest=30):
    """Texts of 0..``longest`` words of the saved classifier's vocabulary."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, longest))) for _ in range(count)]


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_vocab(folder, words=None) -> Path:
    """``folder/vocab.txt``: BERT's special tokens, then ``words`` (default ``WORDS``), one a line."""
    path = Path(folder) / "vocab.txt"
    path.write_text("\n".join([*SPECIAL, *(WORDS if words is None else words)]) + "\n")
    return path


def word_bert(folder, num_labels: int, *, labels: dict[int, str] | None = None, words=None, **config):
    """A tiny random BERT classifier (eval, sdpa, seed 0) over ``words`` (default ``WORDS``) and its tokenizer.

    The vocabulary is written to ``folder``; ``labels`` (id to name) sets ``id2label`` and
    ``label2id``; ``config`` overrides the sizes (hidden 32, 4 layers, 2 heads, 64 positions).
    """
    from transformers import BertTokenizerFast

    words = WORDS if words is None else words
    vocab = word_vocab(folder, words)
    torch.manual_seed(0)
    sizes = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    if labels is not None:
        config.update(id2label=labels, label2id={v: k for k, v in labels.items()})
    config = BertConfig(vocab_size=len(SPECIAL) + len(words), num_labels=num_labels, **{**sizes, **config})
    model = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    return model, BertTokenizerFast(vocab=str(vocab))


def median_gap(values) -> float:
    """Midway between the two distinct values around the median: a threshold on no data point."""
    values = sorted(set(values))
    middle = len(values) // 2
    return (values[middle - 1] + values[middle]) / 2


@pytest.fixture(scope="module")
def loaded_classifier(saved_classifier):
    """``saved_classifier``'s model and tokenizer as ``eek serve`` loads them, one copy per test module."""
    from earlyexit_kernels.integrations.model_folder import load_model

    return load_model(saved_classifier)


@pytest.fixture(scope="session")
def saved_classifier(tmp_path_factory):
    """A folder with a patched tiny BERT (Entropy, exits spread over its 4 layers) and its tokenizer.

    The heads are perturbed and the threshold lies midway between two of layer 1's
    entropies around their median on ``word_texts(300, seed=1)``.
    """
    import earlyexit_kernels as eek
    from earlyexit_kernels.methods.exit_rules import entropy

    path = tmp_path_factory.mktemp("classifier")
    model, tokenizer = word_bert(path, 3, labels={0: "neg", 1: "neutral", 2: "pos"})
    eek.patch(model, eek.Entropy(0.0))
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(torch.randn_like(model.bert.pooler.dense.weight) * 0.5)
        for head in model.early_exit_heads.classifiers:
            head.weight.add_(torch.randn_like(head.weight))
        values = set()
        for text in word_texts(300, seed=1):
            out = model(**tokenizer(text, return_tensors="pt"), return_all_exits=True)
            values.add(float(entropy(out.all_logits[0, 0])))
    eek.patch(model, eek.Entropy(median_gap(values)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def compact_past_two_to_the_31(compact) -> None:
    """A backend's ``compact`` on a [n, S, H] CUDA tensor of more than 2^31 elements (int32 offsets would wrap):
    the last rows and positions land where they belong, bit for bit. Skips below 6 GiB of free GPU memory."""
    n, s, h = 2048, 1040, 1024  # 2.18e9 elements, 4.4 GB in fp16
    assert n * s * h > 2**31
    if torch.cuda.mem_get_info()[0] < 6 * 2**30:
        pytest.skip("needs 6 GiB of free GPU memory")
    hidden = torch.empty(n, s, h, dtype=torch.float16, device="cuda")
    hidden.view(n, -1)[:, :8].copy_(torch.arange(n, device="cuda")[:, None].half())  # row marks
    hidden[:, -1, -4:] = torch.arange(n, device="cuda")[:, None].half() / 2048
    mask = torch.ones(n, s, dtype=torch.bool, device="cuda")
    index = torch.tensor([n - 1, 0, n - 2, 1500], device="cuda")
    got_h, got_m = compact(hidden, mask, index, s)
    for i, row in enumerate(index.tolist()):  # bit for bit (the rest of the buffer is not initialized)
        assert torch.equal(got_h[i].view(torch.int16), hidden[row].view(torch.int16)), row
        assert float(got_h[i, 0, 0]) == row and float(got_h[i, -1, -1]) == row / 2048
    assert bool(got_m.all())
    del hidden, got_h
    torch.cuda.empty_cache()


def write_table(frame, path) -> str:
    """``frame`` (a pandas DataFrame) written to ``path`` in the format its suffix names (.csv, .tsv, .jsonl,
    .parquet), as a user's file for the command line; returns the path as a string."""
    kind = Path(path).suffix[1:]
    if kind in ("csv", "tsv"):
        frame.to_csv(path, index=False, sep="\t" if kind == "tsv" else ",")
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``),
    its threads given back after: the command line's tests time nothing and two threads spin on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
