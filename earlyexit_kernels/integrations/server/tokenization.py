"""The server's tokenisation: long texts cut by characters before they are tokenized, off the event loop.

A request's cost must not grow with its text past what the model reads. As text-embeddings-inference
does, a long text is cut by characters before the tokenizer sees it whole. TEI cuts (or, without
``truncate``, refuses) past ``max_input_length * 250`` characters (its ``MAX_CHAR_MULTIPLIER``); here
the cut starts at ``max_length * 8`` characters (English averages about 4 characters a word-piece
token) and grows 4-fold up to ``max_length * 250`` (``max_chars``, TEI's bound) while it holds fewer
than ``max_length`` tokens, so that a text costs about what the model reads of it.

TEI's refusal can refuse a text the model would have taken: a run of spaces, or one long unknown
word, is many characters and one token or none. Here the cut never changes an answer, because it is
checked: the tokens of the words that lie wholly inside the cut (the word the cut may split left out)
are what the whole text starts (ends, cutting ``"Left"``) with, so once they are ``max_length`` or more,

- without ``truncate`` the whole text is longer than the model takes: 413, said without
  tokenizing the rest;
- with ``truncate`` the tokens kept are the cut's: it is tokenized and truncated in the text's place.

Where even ``max_chars`` characters hold fewer (few tokens in many characters), the text is
tokenized whole, as before the cut: its size is bounded by the body limit (``--max-body-bytes``), and
such texts are cheap to tokenize (few tokens). The one difference the cut can make: a pair whose
texts both hold ``max_length`` tokens or more is truncated to ``max_length`` split between them as the
tokenizer splits it, but which of the two gets the odd token of an odd budget follows their whole
lengths, which the cut does not keep.

A request's texts are tokenized in one batch call (:meth:`Tokenization.encode_async`): on a worker
thread where they hold more than :data:`INLINE_CHARS` characters (Hugging Face's fast tokenizers
release the GIL while they work, so the event loop answers other requests meanwhile), else on the
event loop, where a few short texts cost less than the hand-over: one-text requests of MiniLM-L6
int8, alternating, answered with a lower p99 at concurrency 8 in three pairs of three (46-54 ms
against 55-58) and their tokenizing's p99 fell from 7-13 ms to 1-5 ms
(``benchmarks/results/amd_epyc/inline_requests_cpu.md``). One call for a request of 32 Rotten Tomatoes snippets took 1.69-1.71
ms against 2.23-2.49 ms one call a text (MiniLM-L6's tokenizer, one core of the AMD EPYC, three runs
each of ``benchmarks/micro/request_tokenization.py``). Each
(truncation side, truncate) pair has its own tokenizer copy, set up once: the settings are the
tokenizer's state, and changing them while another thread encodes fails ("Already borrowed").
"""

from __future__ import annotations

import asyncio
import copy

from earlyexit_kernels.integrations.server.errors import RequestError

__all__ = ["CHARS_PER_TOKEN", "Tokenization"]

#: characters per token the char bound allows (text-embeddings-inference's MAX_CHAR_MULTIPLIER)
CHARS_PER_TOKEN = 250
#: characters per token of the first cut (English averages about 4 a word-piece token)
FIRST_CHARS_PER_TOKEN = 8
#: a request's texts of at most this many characters in all are tokenized on the event loop: a worker
#: thread's hand-over costs more than they do (below, :meth:`Tokenization.encode_async`)
INLINE_CHARS = 2048


def _chars(sequences) -> float:
    """Characters of ``sequences``' texts and pairs; infinite where one is not a string (encode says why)."""
    total = 0
    for text, pair in sequences:
        for part in (text, pair):
            if part is None:
                continue
            if not isinstance(part, str):
                return float("inf")
            total += len(part)
    return total


class Tokenization:
    """``tokenizer`` for texts of at most ``max_length`` tokens, with the char bound of the module's doc."""

    def __init__(self, tokenizer, max_length: int, chars_per_token: int = CHARS_PER_TOKEN):
        if tokenizer is None:
            raise ValueError("the server needs the model's tokenizer")
        self.max_length = max_length
        self.max_chars = max_length * chars_per_token
        self.first_chars = min(max_length * FIRST_CHARS_PER_TOKEN, self.max_chars)
        self._tokenizers = {}
        for direction in ("Right", "Left"):
            for truncate in (False, True):
                copied = copy.deepcopy(tokenizer)
                copied.truncation_side = direction.lower()
                copied("warm", None, truncation=truncate, max_length=max_length)  # its settings set once, here
                self._tokenizers[direction, truncate] = copied
        # counts a cut's tokens without special tokens or truncation (settings of its own)
        self._counter = copy.deepcopy(tokenizer)
        self._counter("warm", add_special_tokens=False)

    async def encode_async(self, sequences, truncate: bool, direction: str = "Right"):
        """:meth:`encode`, on a worker thread where the texts hold more than :data:`INLINE_CHARS`
        characters, else here on the event loop: a few short texts take tens of microseconds to
        tokenize, less than the thread's hand-over, which waits for the GIL behind the engine's thread
        and every other hand-over (at 32 concurrent one-text requests the slowest 1% spent 90 ms there)."""
        if _chars(sequences) <= INLINE_CHARS:
            return self.encode(sequences, truncate, direction)
        return await asyncio.to_thread(self.encode, sequences, truncate, direction)

    def encode(self, sequences, truncate: bool, direction: str = "Right") -> list[tuple[list[int], list[int] | None]]:
        """(input ids, token type ids or None) per (text, second text or None) of ``sequences``.

        :class:`RequestError` 400 for a text that is not valid Unicode, 413 for one longer than
        ``max_length`` tokens without ``truncate``."""
        tokenizer = self._tokenizers[direction, truncate]
        # The checks before tokenizing, in order; the first text that fails them stops the request,
        # but a text before it refused for its tokens is refused first, as one text at a time would.
        texts, pairs, refused = [], [], None
        for index, (text, pair) in enumerate(sequences):
            try:
                _check_unicode(index, text, pair)
                text, pair = (self._bounded(index, part, truncate, direction) for part in (text, pair))
            except RequestError as error:
                refused = error
                break
            texts.append(text)
            pairs.append(pair)
        encoded = []
        for index, (ids, types) in enumerate(self._tokenized(tokenizer, texts, pairs, truncate)):
            if len(ids) > self.max_length:
                raise self._too_long(index, f"has {len(ids)} tokens")
            encoded.append((ids, types))
        if refused is not None:
            raise refused
        return encoded

    def _tokenized(self, tokenizer, texts: list[str], pairs: list[str | None], truncate: bool) -> list[tuple]:
        """(input ids, token type ids or None) of each text (and its pair): one batch call where the
        texts all have a pair or none has (the fast tokenizer encodes a batch in Rust, without the
        GIL, and its Python wrapper runs once), else one call a text."""
        if not texts:
            return []
        if all(pair is None for pair in pairs) or all(pair is not None for pair in pairs):
            second = None if pairs[0] is None else pairs
            tokens = tokenizer(texts, second, truncation=truncate, max_length=self.max_length)
            types = tokens.get("token_type_ids")
            return list(zip(tokens["input_ids"], types if types is not None else [None] * len(texts)))
        out = []
        for text, pair in zip(texts, pairs):
            tokens = tokenizer(text, pair, truncation=truncate, max_length=self.max_length)
            out.append((tokens["input_ids"], tokens.get("token_type_ids")))
        return out

    def _bounded(self, index: int, text: str | None, truncate: bool, direction: str) -> str | None:
        """``text``, or its cut where the cut decides (the module's doc)."""
        size = self.first_chars
        if text is None or len(text) <= size:
            return text
        left = truncate and direction == "Left"
        while True:
            cut = text[-size:] if left else text[:size]
            whole = self._whole_word_tokens(cut, split_word_first=left)
            if whole >= self.max_length:
                break
            if size >= self.max_chars or 4 * size >= len(text):
                return text  # few tokens in many characters: the cut cannot tell, tokenize it whole
            size = min(4 * size, self.max_chars)
        if truncate:
            return cut
        raise self._too_long(index, f"has {len(text)} characters, and its first {size} already hold {whole} tokens")

    def _whole_word_tokens(self, cut: str, split_word_first: bool) -> int:
        """Tokens of ``cut``'s words but the one the cut may split (its first or last); 0 where the
        tokenizer cannot say which token is of which word (a slow tokenizer)."""
        tokens = self._counter(cut, add_special_tokens=False)
        try:
            words = tokens.word_ids()
        except ValueError:  # not a fast tokenizer
            return 0
        if not words:
            return 0
        split = words[0] if split_word_first else words[-1]
        return sum(1 for word in words if word != split)

    def _too_long(self, index: int, what: str) -> RequestError:
        return RequestError(
            413,
            "Validation",
            f'input {index} {what}; the model takes at most {self.max_length}: shorten it or send "truncate": true',
        )


def _check_unicode(index: int, *texts) -> None:
    """400 for a text the tokenizer cannot take: JSON's escapes can carry a lone surrogate (``"\\ud800"``),
    which is no Unicode character."""
    for text in texts:
        if text is None:
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise RequestError(
                400,
                "Validation",
                f"input {index} holds {error.object[error.start : error.end]!a}, a lone UTF-16 surrogate, which is "
                f"not a character: send valid Unicode",
            ) from None
