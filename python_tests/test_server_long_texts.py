"""A long text costs what the model reads of it, not its length, and holds up no other request.

A text past ``max_length * 250`` characters (the char bound, as text-embeddings-inference's) is cut
by characters before it is tokenized (:mod:`earlyexit_kernels.integrations.server.tokenization`). Before
the cut, a text of 660,000 words (a body just under the 2,000,000-byte limit) was tokenized whole
before its 413 or its truncated answer: about 1.5 s of tokenizing, alone, on this machine. The cut
never changes an answer: a text the model takes whole is never refused by it, and a truncated one
keeps the tokens the whole text's truncation keeps. Real server on 127.0.0.1; the tiny loaded_classifier
reads 64 tokens, so its char bound is 16,000 characters.
"""

import asyncio
import random
import statistics
import threading
import time

import pytest
from conftest import WORDS

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")

from served_models import serving  # noqa: E402

from earlyexit_kernels.integrations.server.errors import RequestError  # noqa: E402
from earlyexit_kernels.integrations.server.tokenization import CHARS_PER_TOKEN, Tokenization  # noqa: E402

# 660,000 words between two marked ends: 1,980,015 bytes of JSON, just under the 2,000,000-byte limit
LONG = "w2 w3 " + "w1 " * 660_000 + "w4 w5"
SHORT_OF_IT = "w2 w3 " + "w1 " * 100 + "w4 w5"  # the same ends: truncated, the same tokens as LONG's


@pytest.fixture(scope="module")
def server(loaded_classifier):
    with serving(*loaded_classifier, model_id="tiny", max_batch_size=16) as running:
        yield running


SMALL = {"inputs": "w6 w7 w8"}


def _usual_seconds(server, count=30) -> list[float]:
    seconds = []
    for _ in range(count):
        began = time.perf_counter()
        assert server.post("/predict", SMALL).status_code == 200
        seconds.append(time.perf_counter() - began)
    return seconds


@pytest.mark.parametrize("truncation", [None, "Right", "Left"])
def test_a_long_text_is_answered_within_a_second_and_small_requests_beside_it_are_served(server, truncation):
    body = {"inputs": LONG}
    if truncation is not None:
        body.update(truncate=True, truncation_direction=truncation)
    usual = _usual_seconds(server)
    answers, seconds = {}, {}

    def send_long():
        began = time.perf_counter()
        answers["long"] = server.post("/predict", body)
        seconds["long"] = time.perf_counter() - began

    thread = threading.Thread(target=send_long)
    thread.start()
    beside = []
    for _ in range(200):  # small requests for as long as the long one is in flight (bounded)
        began = time.perf_counter()
        assert server.post("/predict", SMALL).status_code == 200
        beside.append(time.perf_counter() - began)
        if not thread.is_alive():
            break
    thread.join(60)

    answer = answers["long"]
    if truncation is None:
        assert answer.status_code == 413, answer.text
        error = answer.json()
        assert error["error_type"] == "Validation" and "at most 64" in error["error"] and "truncate" in error["error"]
    else:
        assert answer.status_code == 200, answer.text
        reference = server.post("/predict", {**body, "inputs": SHORT_OF_IT}).json()
        # the tokens the whole text's truncation keeps: the same answer, scores to rounding (batches differ)
        for got, expected in zip(answer.json(), reference, strict=True):
            assert got == {**expected, "score": pytest.approx(expected["score"], abs=1e-5)}
    # 1 s for the long text (about 1.5 s of tokenizing alone before the cut); each small request
    # beside it within its usual worst plus half a second
    assert seconds["long"] < 1.0, seconds
    assert max(beside) < max(usual) + 0.5, (beside, statistics.quantiles(usual, n=100)[-1])


def test_a_text_past_the_char_bound_that_the_model_takes_whole_is_not_refused(server):
    bound = 64 * CHARS_PER_TOKEN
    spaced = "w1" + " " * (bound + 1000) + "w2"  # many characters, two tokens
    answer = server.post("/predict", {"inputs": spaced})
    assert answer.status_code == 200, answer.text
    assert answer.json() == server.post("/predict", {"inputs": "w1 w2"}).json()
    unknown = "x" * (bound + 1000)  # one word the vocabulary lacks: one [UNK] token
    assert server.post("/predict", {"inputs": unknown}).status_code == 200


def _random_text(rng, chars: int) -> str:
    """Words of the vocabulary with runs of spaces, unknown words and punctuation, about ``chars`` long."""
    parts, size = [], 0
    while size < chars:
        kind = rng.random()
        part = (
            rng.choice(WORDS)
            if kind < 0.7
            else " " * rng.randint(1, 300)
            if kind < 0.85
            else "z" * rng.randint(1, 150)
            if kind < 0.95
            else rng.choice([",", ".", "!"])
        )
        parts.append(part)
        size += len(part) + 1
    return " ".join(parts)


@pytest.mark.parametrize("chars_per_token", [2, 40])
def test_the_cut_keeps_every_answer_the_whole_text_gives(loaded_classifier, chars_per_token):
    """Random texts around the bound (2 characters a token: one cut of 128 characters; 40: cuts of
    512, 2,048 and 2,560): the cut's encoding is the whole text's, truncated or not, either side,
    alone or in a pair with a short text; refused without truncation exactly where the whole text
    has more than 64 tokens."""
    _, tokenizer = loaded_classifier
    cutting = Tokenization(tokenizer, 64, chars_per_token=chars_per_token)
    whole = Tokenization(tokenizer, 64, chars_per_token=10**9)
    whole.first_chars = whole.max_chars  # never cuts
    rng = random.Random(chars_per_token)
    compared = refused = cut = 0
    for _ in range(300):
        text = _random_text(rng, rng.choice([100, 200, 600, 1000, 3000, 10_000]))
        pair = rng.choice([None, "w1 w2 w3", " ".join(rng.choices(WORDS, k=10))])
        cut += len(text) > cutting.first_chars
        for truncate in (False, True):
            for direction in ("Right", "Left"):
                try:
                    expected = whole.encode([(text, pair)], truncate, direction)
                except RequestError as error:
                    assert not truncate and error.status == 413
                    with pytest.raises(RequestError, match="at most 64"):
                        cutting.encode([(text, pair)], truncate, direction)
                    refused += 1
                    continue
                assert cutting.encode([(text, pair)], truncate, direction) == expected, (text, pair, direction)
                compared += 1
    assert cut > 100 and refused > 50 and compared > 500, (cut, refused, compared)


def test_the_word_the_cut_splits_is_not_counted(tmp_path):
    """A word of 150 letters is one [UNK] (past the word-piece limit of 100 characters), but the
    91 letters of it that a cut keeps are 91 word pieces: counted, they would make a text of 63
    tokens look longer than the 64 the model takes."""
    from transformers import BertTokenizerFast

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "w1", "a", "##a"]))
    tokenizer = BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    cutting = Tokenization(tokenizer, 64, chars_per_token=4)  # one cut, of 256 characters
    text = "w1 " * 55 + "a" * 150 + " w1" * 5  # the cut ends inside the long word
    assert len(tokenizer(text)["input_ids"]) == 63
    for truncate in (False, True):
        ((ids, _),) = cutting.encode([(text, None)], truncate)
        assert ids == tokenizer(text)["input_ids"]


def test_a_request_s_texts_tokenized_as_one_batch_are_each_what_one_call_gives(loaded_classifier):
    """A request's texts go to the tokenizer as one batch (all with a pair, or none with one) and as
    one call a text where pairs are mixed: either way each text's ids and token types are what
    encoding it alone gives, truncated or not, either side; and of two texts refused, the first is
    named, whichever check refuses it (its tokens, or a lone surrogate in the one after it)."""
    _, tokenizer = loaded_classifier
    tokenization = Tokenization(tokenizer, 64)
    rng = random.Random(7)
    for _ in range(40):
        texts = [" ".join(rng.choices(WORDS, k=rng.choice([1, 5, 30, 90]))) for _ in range(rng.randint(1, 12))]
        pairs = rng.choice(
            [
                [None] * len(texts),
                [" ".join(rng.choices(WORDS, k=rng.randint(1, 40))) for _ in texts],
                [rng.choice([None, "w1 w2"]) for _ in texts],
            ]
        )
        for truncate in (False, True):
            for direction in ("Right", "Left"):
                one_by_one = []
                for index, sequence in enumerate(zip(texts, pairs)):
                    try:
                        ((ids, types),) = tokenization.encode([sequence], truncate, direction)
                    except RequestError as error:
                        one_by_one = error.message.replace("input 0", f"input {index}")
                        break
                    one_by_one.append((ids, types))
                try:
                    batch = tokenization.encode(list(zip(texts, pairs)), truncate, direction)
                except RequestError as error:
                    assert not truncate and error.message == one_by_one
                    continue
                assert batch == one_by_one
    calls = []
    real = tokenization._tokenizers["Right", False]
    tokenization._tokenizers["Right", False] = lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs)
    tokenization.encode([(text, None) for text in ("w1", "w2 w3", "w4 w5 w6")], False)
    tokenization.encode([(text, "w7") for text in ("w1", "w2 w3")], False)
    assert [len(args[0]) for args in calls] == [3, 2]  # one call a request, its texts as a list
    tokenization._tokenizers["Right", False] = real
    too_long = " ".join(["w1"] * 100)
    with pytest.raises(RequestError) as refused:
        tokenization.encode([("w2", None), (too_long, None), ("w3 \ud800", None)], False)
    assert refused.value.status == 413 and "input 1 has" in refused.value.message
    with pytest.raises(RequestError) as refused:
        tokenization.encode([("w2 \ud800", None), (too_long, None)], False)
    assert refused.value.status == 400 and "input 0 holds" in refused.value.message


def test_a_few_short_texts_are_tokenized_on_the_event_loop_and_more_on_a_worker_thread(loaded_classifier):
    """Up to INLINE_CHARS characters a request's texts are tokenized where the request is served (the
    hand-over to a worker thread costs more than they do); past it on a worker thread, so that the event
    loop serves others meanwhile. Either way the answer is encode's, refusals included."""
    from earlyexit_kernels.integrations.server import tokenization as module

    _, tokenizer = loaded_classifier
    tokenization = Tokenization(tokenizer, 64, chars_per_token=10**6)  # no cut: only the threads differ
    loop_thread = []

    async def encoded(sequences):
        loop_thread.append(threading.get_ident())
        threads = []
        real = tokenization.encode
        tokenization.encode = lambda *args: threads.append(threading.get_ident()) or real(*args)
        try:
            return await tokenization.encode_async(sequences, True), threads[0]
        finally:
            tokenization.encode = real

    short = [("w1 w2 w3", None), ("w4", "w5 w6")]
    long = [(" ".join(["w1"] * (module.INLINE_CHARS // 2)), None)]  # 3 characters a word: past the bound
    assert module._chars(short) == 8 + 2 + 5 <= module.INLINE_CHARS < module._chars(long)
    for sequences, on_the_loop in ((short, True), (long, False)):
        answer, thread = asyncio.run(encoded(sequences))
        assert answer == tokenization.encode(sequences, True)
        assert (thread == loop_thread[-1]) == on_the_loop
    with pytest.raises(RequestError) as refused:  # refused the same way on the loop
        asyncio.run(tokenization.encode_async([("w1 \ud800", None)], False))
    assert refused.value.status == 400 and "input 0 holds" in refused.value.message
    assert module._chars([("w1", None), (7, None)]) == float("inf")  # not a string: encode refuses it
