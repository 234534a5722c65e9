"""The package's own classification task: easy and hard sequences, generated from a seed.

Two classes, each with a few keyword tokens; the rest of a sequence is filler.

- easy (half of the examples): 3 to 5 keywords of the label's class and none of
  the other. A bag of words settles it, so the first layers can.
- hard: keywords of both classes, one class ahead by one (``m + 1`` against
  ``m``, ``m`` from 1 to 4), and in half of them a ``NOT`` token that flips the
  label. Deciding needs counting and the negation, so early heads are often wrong
  on them (``benchmarks/results/unknown_cpu/demo_cpu.txt`` has the measured accuracies).

Sequences have random lengths (so batches are padded), start with ``[CLS]`` and
end with ``[SEP]``. Nothing is downloaded: the same seed gives the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TaskConfig", "make_split", "VOCAB_SIZE", "PAD", "CLS", "SEP", "NOT"]

PAD, CLS, SEP, NOT = 0, 1, 2, 3
KEYWORDS = (torch.arange(4, 8), torch.arange(8, 12))
FILLER_START = 12
VOCAB_SIZE = 64
MAX_NEGATIONS = 1
MAX_MINORITY = 4


@dataclass(frozen=True)
class TaskConfig:
    min_len: int = 16
    max_len: int = 32
    hard_fraction: float = 0.5


def _sequence(label: int, hard: bool, length: int, generator: torch.Generator) -> list[int]:
    def draw(tokens: torch.Tensor, count: int) -> list[int]:
        return tokens[torch.randint(len(tokens), (count,), generator=generator)].tolist()

    body_len = length - 2
    if not hard:
        special = draw(KEYWORDS[label], int(torch.randint(3, 6, (1,), generator=generator)))
    else:
        negations = int(torch.randint(0, MAX_NEGATIONS + 1, (1,), generator=generator))
        majority = label ^ (negations % 2)
        minority_count = int(torch.randint(1, MAX_MINORITY + 1, (1,), generator=generator))
        special = draw(KEYWORDS[majority], minority_count + 1) + draw(KEYWORDS[1 - majority], minority_count)
        special += [NOT] * negations
    filler = torch.randint(FILLER_START, VOCAB_SIZE, (body_len - len(special),), generator=generator).tolist()
    body = filler + special
    order = torch.randperm(len(body), generator=generator).tolist()
    return [CLS] + [body[i] for i in order] + [SEP]


def make_split(size: int, seed: int, config: TaskConfig = TaskConfig()) -> dict[str, torch.Tensor]:
    """``size`` examples: ``input_ids`` and ``attention_mask`` [size, max_len], ``labels`` and ``hard`` [size]."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((size, config.max_len), PAD, dtype=torch.long)
    mask = torch.zeros(size, config.max_len, dtype=torch.long)
    labels = torch.randint(2, (size,), generator=generator)
    hard = torch.rand(size, generator=generator) < config.hard_fraction
    lengths = torch.randint(config.min_len, config.max_len + 1, (size,), generator=generator)
    for row in range(size):
        tokens = _sequence(int(labels[row]), bool(hard[row]), int(lengths[row]), generator)
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "hard": hard}


def batches(split: dict[str, torch.Tensor], batch_size: int, *, shuffle_seed: int | None = None):
    """The split cut into dicts of ``batch_size`` rows (shuffled when a seed is given)."""
    size = split["labels"].shape[0]
    order = torch.arange(size)
    if shuffle_seed is not None:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(shuffle_seed))
    return [
        {k: v[order[start : start + batch_size]] for k, v in split.items() if k != "hard"}
        for start in range(0, size, batch_size)
    ]


def token_names() -> list[str]:
    """A word for every token id: the demo task as text, for tools that start from text."""
    names = ["[PAD]", "[CLS]", "[SEP]", "not"]
    names += [f"pos{i}" if i < 8 else f"neg{i}" for i in range(4, FILLER_START)]
    return names + [f"w{i}" for i in range(FILLER_START, VOCAB_SIZE)]


def tokenizer():
    """A fast tokenizer whose words are :func:`token_names`: ``tokenizer(texts(split))`` gives the split's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(token_names())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", model_max_length=512
    )


def texts(split: dict[str, torch.Tensor]) -> list[str]:
    """The split's sequences as text (without [CLS], [SEP] and padding, which the tokenizer adds)."""
    names = token_names()
    out = []
    for ids, mask in zip(split["input_ids"], split["attention_mask"]):
        body = ids[1 : int(mask.sum()) - 1].tolist()
        out.append(" ".join(names[t] for t in body))
    return out
