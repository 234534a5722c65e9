"""``eek.classify``: early-exit predictions for a stream of texts, text pairs or token ids.

    for p in eek.classify(model, texts, tokenizer=tok):
        p.index, p.logits, p.exit_layer, p.layers_run

    predictions = eek.classify(model, texts, tokenizer=tok, audit_fraction=0.05)
    list(predictions); predictions.audit.rate, predictions.audit.bound()   # 5% also run at full depth
    predictions.certificate.served_policy    # an eek fit folder's threshold, re-certified on the audit

The stream runs on :class:`earlyexit_kernels.engine.engines.continuous.engine.ContinuousEngine` (every layer
call refilled, a sequence leaves as soon as its policy says so) or, on CUDA where the model runs
the graphed step, on :class:`earlyexit_kernels.engine.engines.cohort_engine.CohortEngine` (length-sorted
cohorts sized by a token budget through the graphed step, read back a cohort late;
:mod:`earlyexit_kernels.engine.engines.choice`).
Inputs are consumed lazily, a bounded number ahead of the engine.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from earlyexit_kernels.calibration.online import OnlineCertificate
from earlyexit_kernels.engine.engines.choice import choose_engine, make_engine
from earlyexit_kernels.engine.entry.audit import AuditConfig, AuditRunner, AuditWatch
from earlyexit_kernels.engine.entry.kept_engines import KeptEngines
from earlyexit_kernels.engine.step.heads import weights_fingerprint
from earlyexit_kernels.engine.stream.engine_config import EngineConfig
from earlyexit_kernels.methods.risk_control import check_fraction

__all__ = ["Prediction", "Predictions", "classify"]


@dataclass(frozen=True, slots=True)
class Prediction:
    """One input's prediction: equal to ``model(...)`` on that input alone.

    ``index``: position of the input. ``logits``: FloatTensor [C] on the CPU, model dtype.
    ``exit_layer``: 1..L. ``layers_run``: layers computed (differs only with SkipGates).
    ``disagreement``: for a sequence the audit also ran through the full model, its disagreement
    with it (1.0 or 0.0: another class or the same; multi-label: the fraction of labels decided
    otherwise, see :func:`earlyexit_kernels.calibration.row_losses.disagreement`); None when not audited.
    """

    index: int
    logits: torch.Tensor
    exit_layer: int
    layers_run: int
    disagreement: float | None = None


class Predictions(Iterator[Prediction]):
    """What :func:`classify` returns: its :class:`Prediction` objects, lazily (as a generator), and
    ``audit``: the :class:`~earlyexit_kernels.engine.entry.audit.AuditWatch` counting the audited
    sequences (None without an audit), complete once the predictions are exhausted;
    ``certificate``: the :class:`~earlyexit_kernels.calibration.online.OnlineCertificate`
    re-certifying the threshold on them (None where it does not run)."""

    __slots__ = ("_generator", "audit", "certificate")

    def __init__(self, generator: Iterator[Prediction], audit: AuditWatch | None, certificate=None):
        self._generator, self.audit, self.certificate = generator, audit, certificate

    def __iter__(self) -> Predictions:
        return self

    def __next__(self) -> Prediction:
        return next(self._generator)

    def close(self) -> None:
        """Stop early: as a generator's ``close``."""
        self._generator.close()


def classify(
    model,
    inputs: Iterable,
    *,
    tokenizer=None,
    max_batch_size: int | None = None,
    max_tokens: int | None = None,
    max_length: int | None = None,
    ordered: bool = True,
    progress: bool = False,
    compile: bool | dict = False,
    max_in_flight: int | None = None,
    length_step: int | None = None,
    read_ahead: int | None = None,
    admission: str = "length",
    packed: bool | None = None,
    audit_fraction: float = 0.0,
    audit: AuditWatch | None = None,
    recertify=None,
    dtype: str | None = None,
    device: str | None = None,
    engine: str = "auto",
) -> Predictions:
    """Classify every item of ``inputs`` with the patched ``model``; an iterator of :class:`Prediction`.

    ``inputs``: an iterable of ``str``, ``(str, str)`` pairs, or dicts with ``input_ids``
    (list or 1-D tensor, special tokens included) and optionally ``token_type_ids`` and a
    right-padding ``attention_mask``; read lazily. Texts need ``tokenizer``.
    ``max_batch_size``: most rows per layer call (None: 64 on the continuous engine; on a GPU's
    cohort engine as many as ``max_tokens`` allows). ``max_tokens``: most rows x padded length per
    layer call (None: no limit on the continuous engine, 16,384 on the cohort engine).
    ``max_length``: longer sequences are truncated (one warning says so); default what the model's
    positions hold. ``ordered``: yield in input order
    (True) or as sequences exit (False). ``progress``: a tqdm bar. ``compile``: layer
    calls through ``torch.compile`` (True, or a dict of its options, e.g.
    ``{"mode": "reduce-overhead"}`` on a GPU). ``max_in_flight``, ``length_step``,
    ``admission`` (here ``"length"`` by default), ``packed``: see
    :class:`earlyexit_kernels.engine.engines.continuous.engine.ContinuousEngine`. ``read_ahead``: how many
    tokenized inputs wait for admission (default ``32 * max_in_flight``); the length sweep
    picks from them.

    ``audit_fraction``: a fraction in [0, 1] of the sequences, drawn at random (seed 0), that also
    run through the full model (the model unpatched, on the same weights); their
    :attr:`Prediction.disagreement` says whether it predicts another class, and the returned
    iterator's ``audit`` (an :class:`~earlyexit_kernels.engine.entry.audit.AuditWatch`) counts them, with
    the observed disagreement and its upper bound. It costs the full model's time on that fraction
    of the sequences (run sorted by length in batches of ``max_batch_size``). ``audit``: a watch of your own instead (its
    fraction, budget, confidence and seed; it keeps counting over several calls). Default: no audit,
    and nothing changes. Without re-certification the early exit's predictions are the same either way.

    ``recertify``: move the served threshold along the folder's certified path as the audited
    sequences allow, and back to full depth when they show it over the budget
    (:mod:`earlyexit_kernels.calibration.online`; the iterator's ``certificate``). None
    (default): on where an audit runs on a model loaded from an ``eek fit`` folder whose certificate
    bounds disagreement and which serves its certified policy; True: on, or a ``RecertifyError``
    saying what is missing; False: off; an ``OnlineCertificate`` of your own: on, with it (it keeps
    its state over several calls). (None and True are resolved by ``eek.classify``; this function,
    below the model folders' layer, takes False, None as off, or a certificate.) Re-certification replays every candidate on the audited rows, so
    their full-depth run records every head's logits (the patched model's all-exits forward).

    Memory: at most ``read_ahead + max_in_flight`` inputs (and one tokenizing chunk of
    ``max_batch_size``) are read and not yet yielded at any time; only ``max_in_flight``
    of them hold hidden states.

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"int8"``) / ``device`` (``"auto"``, ``"cpu"``,
    ``"cuda"``): run a copy of ``model`` on that base (:func:`earlyexit_kernels.engine.layers.precision.to_base`;
    int8 with the family's recipe, the exit heads fused on it); ``model`` itself is left as it is.
    To keep a base across calls, convert the model once with ``to_base`` instead.

    ``engine``: ``"auto"`` (the cohort engine on CUDA where the model runs the graphed step, else the
    continuous engine), ``"continuous"``, ``"cohorts"`` or ``"segments"`` (opt-in, E3's layer segments
    with the default three, :mod:`earlyexit_kernels.engine.engines.segments.engine`; see
    :mod:`earlyexit_kernels.engine.engines.choice`).
    """
    if dtype is not None or device is not None:
        import copy

        from earlyexit_kernels.engine.layers.precision import to_base

        model = to_base(copy.deepcopy(model), dtype, "auto" if device is None else device)
    config = EngineConfig(
        max_batch_size=max_batch_size,
        max_tokens=max_tokens,
        max_length=max_length,
        length_step=length_step,
        max_in_flight=max_in_flight,
        compile=compile,
        admission=admission,
        packed=packed,
        max_age=None,  # throughput first: the admission order's and the queues' own bounds
        engine=engine,
    )
    engine, give_back = _engine(model, config, kept=dtype is None and device is None and not compile)
    if read_ahead is None:
        # Wide: the length sweep's batches pad less and exit together more the more it sees.
        read_ahead = 32 * engine.max_in_flight
    if not isinstance(read_ahead, int) or isinstance(read_ahead, bool) or read_ahead < 1:
        raise ValueError(f"read_ahead must be an integer >= 1, got {read_ahead!r}")
    audit_fraction = check_fraction(audit_fraction)
    if audit is not None:
        if audit_fraction:
            raise ValueError("give audit_fraction or a watch of your own (audit=AuditWatch(...)), not both")
        if not isinstance(audit, AuditWatch):
            raise TypeError(f"audit must be an earlyexit_kernels AuditWatch, got {type(audit).__name__}")
    elif audit_fraction:
        audit = AuditWatch(AuditConfig(audit_fraction))
    certificate = _online_certificate(model, recertify, audit)
    if certificate is not None:
        engine.set_policy(certificate.served_policy)
    auditor = None
    if audit is not None:
        auditor = _Auditor(
            model, audit, engine.max_batch_size, max_tokens or getattr(engine, "max_tokens", None), certificate, engine
        )
    return Predictions(
        _predictions(engine, inputs, tokenizer, ordered, progress, read_ahead, auditor, give_back), audit, certificate
    )


def _engine(model, config: EngineConfig, *, kept: bool):
    """``(engine, give_back)``: on the graphed step, an engine the patched model kept from an earlier
    call with these settings and heads (its CUDA graphs captured then), else a new one; ``give_back()``
    keeps it for the next call (:mod:`earlyexit_kernels.engine.entry.kept_engines`). Elsewhere a new engine,
    and ``give_back`` does nothing."""
    choice = choose_engine(model, config, "eek.classify")  # made once, handed to the engine
    state = choice.state
    if not kept or choice.step != "graphed" or choice.kind != "continuous":
        # the cohort engine keeps nothing of its own: its graphs live in the patched model's static batches
        return make_engine(model, config, choice), lambda: None
    if state.kept_engines is None:
        state.kept_engines = KeptEngines()
    engines = state.kept_engines
    key = (
        config,
        state.backend,
        state.step,
        id(state.adapter),
        weights_fingerprint(state.adapter.heads, state.adapter),
    )
    engine = engines.take(key, lambda: make_engine(model, config, choice))
    if engine.policy is not state.policy:  # a certificate moved the threshold in the call that gave it back
        engine.set_policy(state.policy)
    return engine, lambda: engines.give_back(key, engine)


def _online_certificate(model, recertify, audit: AuditWatch | None):
    """The certificate to feed, or None. None / True (re-certify as the model's folder allows) are resolved
    above this layer, where folders are read, by ``eek.classify``
    (:func:`earlyexit_kernels.integrations.classify.classify`)."""
    if recertify is None or recertify is False:
        return None
    if not isinstance(recertify, OnlineCertificate):
        raise TypeError(
            f"recertify here is False, None or an OnlineCertificate; got {recertify!r} (eek.classify resolves True)"
        )
    if audit is None:
        raise ValueError("recertify=OnlineCertificate(...) reads the audit: give audit_fraction too")
    return recertify


class _Auditor:
    """The audit's side of a stream: which sequences the watch chose, when they run through the
    full model (the shared :class:`~earlyexit_kernels.engine.entry.audit.AuditRunner`), their losses.

    Chosen sequences wait until ``WINDOW`` batches of them do, then run through the full model
    together, sorted by length in batches of ``batch`` rows (and ``max_tokens``): in input
    order, batches of 32 of lengths spread evenly over 8..128 hold 1.85 times the real tokens;
    sorted in windows of 16 batches, 1.05 times (1.01 sorted whole). One whose early exit comes
    out first runs at once with those waiting, so that no prediction waits for the window to
    fill. The losses of a step are recorded together.
    """

    WINDOW = 16

    def __init__(self, model, watch: AuditWatch, batch: int, max_tokens: int | None, certificate=None, engine=None):
        self.watch, self.batch = watch, batch
        self.runner = AuditRunner(
            model,
            watch,
            max_batch_size=batch,
            max_tokens=max_tokens,
            certificate=certificate,
            on_move=None if engine is None else engine.set_policy,
        )
        self.waiting: dict[int, tuple] = {}  # index -> (input_ids, token_type_ids): chosen, not run yet
        self.full: dict[int, torch.Tensor] = {}  # index -> the full model's logits [C]
        self.losses: list[float] = []

    def submitted(self, index: int, input_ids, token_type_ids) -> None:
        if self.watch.choose():
            self.waiting[index] = (input_ids, token_type_ids)
            if len(self.waiting) >= self.WINDOW * self.batch:
                self._run()

    def loss(self, index: int, logits: torch.Tensor) -> float | None:
        """The disagreement of sequence ``index`` whose early exit gave ``logits``; None when not audited."""
        if index in self.waiting:
            self._run()
        full = self.full.pop(index, None)
        if full is None:
            return None
        value = self.runner.losses(logits[None], full[None])[0]
        self.losses.append(value)
        return value

    def record(self) -> None:
        self.runner.record(self.losses)
        self.losses = []

    def _run(self) -> None:
        keys = list(self.waiting)
        logits = self.runner.full_logits([self.waiting[k] for k in keys])
        self.waiting.clear()
        self.full.update(zip(keys, logits))


def _predictions(
    engine,
    inputs,
    tokenizer,
    ordered: bool,
    progress: bool,
    read_ahead: int,
    auditor: _Auditor | None = None,
    give_back=None,
):
    total = len(inputs) if hasattr(inputs, "__len__") else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="seq", desc="eek.classify")
    encoded = _encode(iter(inputs), tokenizer, engine.max_length, chunk=engine.max_batch_size)
    # Read ahead: up to read_ahead pending, and no more than read_ahead + max_in_flight inputs
    # read and not yet yielded (pending, in flight, or exited and waiting for their turn).
    limit = read_ahead + engine.max_in_flight
    waiting: dict[int, Prediction] = {}
    next_index = 0
    exhausted = False
    try:
        while True:
            while (
                not exhausted
                and engine.pending < read_ahead
                and engine.pending + engine.in_flight + len(waiting) < limit
            ):
                item = next(encoded, None)
                if item is None:
                    exhausted = True
                else:
                    engine.submit(*item)
                    if auditor is not None:
                        auditor.submitted(*item)
            if engine.idle:
                break
            finished = engine.step()
            losses = [None] * len(finished) if auditor is None else [auditor.loss(d.key, d.logits) for d in finished]
            if auditor is not None:
                auditor.record()
            for done, loss in zip(finished, losses):
                prediction = Prediction(done.key, done.logits, done.exit_layer, done.layers_run, loss)
                if bar is not None:
                    bar.update(1)
                if not ordered:
                    yield prediction
                    continue
                waiting[prediction.index] = prediction
                while next_index in waiting:
                    yield waiting.pop(next_index)
                    next_index += 1
    finally:
        if bar is not None:
            bar.close()
        if give_back is not None:
            give_back()


def _encode(items: Iterator, tokenizer, max_length: int, chunk: int):
    """``(index, input_ids, token_type_ids)`` per input, tokenizing texts ``chunk`` inputs at a time."""
    truncated = _TruncationNotice(max_length)
    start = 0
    while True:
        batch = list(itertools.islice(items, chunk))
        if not batch:
            return
        encoded: list = [None] * len(batch)
        texts, pairs = [], []
        for i, item in enumerate(batch):
            if isinstance(item, str):
                texts.append(i)
            elif isinstance(item, (tuple, list)):
                if len(item) != 2 or not all(isinstance(text, str) for text in item):
                    raise TypeError(f"input {start + i}: a text pair must be two strings, got {item!r}")
                if item[1]:
                    pairs.append(i)
                else:  # as tokenizer(text, ""), which ignores an empty second text
                    batch[i] = item[0]
                    texts.append(i)
            elif isinstance(item, dict):
                encoded[i] = _token_ids(item, start + i, max_length, truncated)
            else:
                raise TypeError(
                    f"input {start + i}: expected a str, a (str, str) pair or a dict with input_ids, "
                    f"got {type(item).__name__}"
                )
        for group in (texts, pairs):
            if not group:
                continue
            if tokenizer is None:
                raise ValueError(
                    "classify got texts but no tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...)"
                )
            # One token more than allowed tells which inputs truncation cuts; only those are tokenized again.
            out = _tokenize(tokenizer, [batch[i] for i in group], max_length + 1)
            for k, i in enumerate(group):
                if len(out["input_ids"][k]) > max_length:
                    truncated.note(start + i)
                    encoded[i] = _first(_tokenize(tokenizer, [batch[i]], max_length), 0)
                else:
                    encoded[i] = _first(out, k)
        for i, (ids, types) in enumerate(encoded):
            yield start + i, ids, types
        start += len(batch)


def _tokenize(tokenizer, items: list, max_length: int):
    if isinstance(items[0], str):
        return tokenizer(items, truncation=True, max_length=max_length)
    return tokenizer([a for a, _ in items], [b for _, b in items], truncation=True, max_length=max_length)


def _first(encoding, k: int) -> tuple[list[int], list[int] | None]:
    types = encoding.get("token_type_ids")
    return encoding["input_ids"][k], (types[k] if types is not None else None)


def _token_ids(item: dict, index: int, max_length: int, truncated) -> tuple[list[int], list[int] | None]:
    if "input_ids" not in item:
        raise TypeError(f"input {index}: a dict input needs input_ids (and optionally token_type_ids, attention_mask)")
    ids = _as_list(item["input_ids"], index, "input_ids")
    types = (
        _as_list(item["token_type_ids"], index, "token_type_ids") if item.get("token_type_ids") is not None else None
    )
    if item.get("attention_mask") is not None:
        mask = [1 if m else 0 for m in _as_list(item["attention_mask"], index, "attention_mask")]
        length = sum(mask)
        if len(mask) != len(ids) or mask != [1] * length + [0] * (len(mask) - length):
            raise ValueError(
                f"input {index}: attention_mask must have one entry per token, ones then zeros (right padding)"
            )
        ids = ids[:length]
        types = types[:length] if types is not None else None
    if types is not None and len(types) != len(ids):
        raise ValueError(f"input {index}: token_type_ids has {len(types)} entries for {len(ids)} tokens")
    if not ids:
        raise ValueError(f"input {index}: no tokens; a sequence needs at least one ([CLS])")
    if len(ids) > max_length:
        truncated.note(index)
        ids = ids[:max_length]
        types = types[:max_length] if types is not None else None
    return ids, types


def _as_list(value, index: int, name: str) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"input {index}: {name} must be 1-D (one sequence), got shape {tuple(value.shape)}")
        return value.tolist()
    return list(value)


class _TruncationNotice:
    """Warns once, at the first input longer than ``max_length``."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.warned = False

    def note(self, index: int) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"input {index} (and maybe others) is longer than max_length={self.max_length} tokens and is "
                f"truncated; raise max_length (up to what the model's positions hold) to keep more",
                stacklevel=4,
            )
