"""The continuous engine's scheduling policy: which layer runs next, on which rows, in which shape.

Pure bookkeeping on the host, no tensors: the runner (:mod:`earlyexit_kernels.engine.engines.continuous.engine`)
executes what this module hands it and reports back which rows go on to which layer.

**Shapes** (:class:`ShapeBuckets`). A layer call runs its rows padded to the longest of
them. Eager execution runs exactly that: as many rows as the call holds, as long as its
longest row (``bucket_rows=False``, ``length_step=1``). Compiled execution (``torch.compile``,
CUDA graphs) reuses one graph per shape, so there the shapes come from two small fixed sets:
row counts 1, 2, 4, ..., and lengths in steps of ``length_step``.

**Cohorts and groups.** An admission's sequences are sorted by length and cut into
*cohorts* of at most ``max_batch_size`` rows (:meth:`LayerScheduler.admit`): exactly the
length-sorted batches the per-batch loop would run. A cohort's rows waiting for one layer
form a *group*: the rows the per-batch loop would run in one call of that layer (its
survivors). A layer call runs groups merged, and parts of groups where a group fills a call.

**Merging.** A call costs ``call_cost + rows x length`` (in token slots; the length
padded, the rows not: a row count's padding is a compiled graph's, not work the
per-batch loop would avoid): ``call_cost`` is what a layer call costs beyond its tokens
(dispatch, the exit step, the host's work), expressed in tokens. The groups of a layer, in length order, are
packed greedily from the shortest: a group joins the call before it when the merged call
fits (``capacity`` rows at its length) and costs no more than the two apart. A group that
does not fit *fills* the call with its shortest rows where that costs no more than the call
and the group apart; the rest of the group (its longest rows) starts the next call, which
later groups may join. Survivors of batches of 32 are seldom 32: without filling, two groups
of 20 run as two calls of 20; with it, as calls of 32 and 8, and the 8 take the next group's
rows. (A BERT layer at hidden 128, 2 CPU threads, 36 positions a row: 4.3 us a position in a
call of 4 rows, 2.5 in one of 16, 2.3 in one of 32; ``benchmarks/results/intel_xeon/op_by_op_layer_cpu.md``.)

**The rule**, before every layer call (:meth:`LayerScheduler.decide`):

0. **Bounded waiting** (with ``max_age``, :mod:`earlyexit_kernels.engine.stream.aging`). Once a sequence
   has waited ``max_age`` layer calls since its submission, the oldest such is admitted or its call runs.
1. **Overdue first.** When the group that has waited longest has waited ``max_wait``
   layer calls or more, the next call is the one holding it.
2. **The deepest closed call.** A planned call is *closed* when it cannot gain rows: it
   is full, or a later group in length order could not join it; and none of its cohorts
   has rows waiting at a shallower layer (a layer-skipping policy may still send some).
   From the last layer down, the fullest closed call of the first layer that has one.
   Deep layers first keep the sequences in flight few and let them leave soonest.
3. **Admit.** Otherwise, while there is input and room for at least one full cohort,
   new sequences are embedded into layer 1, whole cohorts (up to the room left).
4. **Drain.** Otherwise, with input still coming but no room, the fullest call of the
   deepest layer (it frees room soonest); with no input, the fullest call of the
   shallowest layer (its survivors may still merge with the groups waiting deeper).

**Going on at once.** When every row of a call goes on to the next layer, the runner calls
:meth:`LayerScheduler.advance`, which is :meth:`~LayerScheduler.requeue_many` of them all but
for one case: where the rule would take exactly those rows next (the call was one full cohort,
nothing waits at that layer or deeper, nothing is overdue), they are held as the next call
instead of queued, and :meth:`~LayerScheduler.decide` returns it. The calls are the same; a
cohort that nobody leaves runs its layers as the per-batch loop does, without the queues.

**Guarantees.** Every call runs at least one row, so the stream drains. Groups merge, and
fill a call, only where the cost model says that costs no more than the parts apart, so
on the same cohorts the calls of each layer cost at most what the per-batch loop's calls
cost, in the cost model, and are no more of them (tested on length-sorted streams); where no
merge pays, the engine runs exactly the per-batch loop's calls. With eager shapes and ``eek.classify``'s length
admission, a stream whose sequences all wait for admission at the start is cut into the
same cohorts as sorting the whole stream would. A group waits at most ``max_wait +
max_in_flight`` layer calls in a queue (:attr:`LayerScheduler.wait_bound`): once overdue,
each call serves the oldest overdue group, and only the groups that entered their queue
before it (fewer than ``max_in_flight``) can be served first. At most ``max_in_flight``
sequences are in flight. With ``max_age`` a sequence leaves within ``max_age + L x n`` layer
calls of its submission (``2 L x n`` where the engine is full), ``n`` the sequences submitted no
later and still there when it is overdue (:mod:`~earlyexit_kernels.engine.stream.aging`); the guarantees
above hold where nothing is overdue (an all-at-start stream is overdue at once: ``eek.classify``
runs without it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from earlyexit_kernels.engine.engines.continuous.shape_buckets import ShapeBuckets
from earlyexit_kernels.engine.stream.aging import ADMIT_OVERDUE, AgeRule

__all__ = [
    "Admit",
    "Call",
    "LayerScheduler",
    "PackingRule",
    "ShapeBuckets",
    "default_call_cost",
    "default_length_step",
    "default_max_in_flight",
]

# Below this share of real tokens, packed execution of a layer call pays for its gathers and scatters
# (measured on a CPU at H 128 and 384: break-even near 0.85, 2x at 0.4; benchmarks/archive/packed_vs_padded_layer.py).
PACK_BELOW_FILL = 0.75


def default_call_cost(hidden_size: int) -> float:
    """What a layer call costs beyond its tokens, in tokens: its fixed cost is time (the host,
    dispatch, the exit step) while a token's grows as H^2."""
    return 32.0 * (128 / hidden_size) ** 2


def default_max_in_flight(max_batch_size: int) -> int:
    return 16 * max_batch_size


def default_length_step(fixed_shapes: bool) -> int:
    """Compiled calls reuse one graph per length, in steps of 8; eager calls run their exact lengths."""
    return 8 if fixed_shapes else 1


@dataclass(frozen=True)
class PackingRule:
    """When a layer call runs its token-wise parts on its real tokens only (packed execution,
    :mod:`earlyexit_kernels.engine.layers.packed_layer`) instead of on every padded position.

    ``below_fill``: the share of real tokens below which a call packs (0: never, inf: whenever
    it holds padding).
    """

    below_fill: float

    @classmethod
    def choose(cls, packable: bool, packed: bool | None) -> PackingRule:
        """``packed`` as the engine was given it: None where it pays, True always, False never."""
        if not packable or packed is False:
            return cls(0.0)
        return cls(math.inf if packed else PACK_BELOW_FILL)

    def packs(self, tokens: int, slots: int) -> bool:
        """Whether a call of ``tokens`` real tokens in ``slots`` padded positions runs packed."""
        return tokens < slots and tokens < self.below_fill * slots


@dataclass(frozen=True, slots=True)
class Call:
    """One layer call: run 1-based ``layer`` on ``rows``, padded to ``padded_rows`` x ``padded_length``."""

    layer: int
    padded_length: int
    rows: tuple[int, ...]
    padded_rows: int


@dataclass(frozen=True)
class Admit:
    """Embed up to ``count`` new sequences into layer 1."""

    count: int


@dataclass
class _Group:
    """The rows of one cohort waiting for one layer."""

    cohort: int
    rows: list[int]
    longest: int  # padded length of its longest row
    since: int  # the layer call count when its first row entered the queue


@dataclass
class _Planned:
    """A call the plan of one layer holds: ``parts``, each ``(group, start, stop)``: that group's
    rows ``start:stop`` (shortest first; all of them, or one part of a split group)."""

    parts: list[tuple[_Group, int, int]]
    rows: int
    padded_length: int
    closed: bool  # it can gain no rows of this layer: full, or the next group in length order could not join

    @property
    def groups(self) -> list[_Group]:
        return [group for group, _, _ in self.parts]


class LayerScheduler:
    """One queue of groups per layer; :meth:`decide` applies the rule of the module docstring.

    Rows are the runner's integers (its slots). :meth:`admit` puts one admission's new
    sequences into layer 1 (cut into cohorts), :meth:`add` one sequence (a cohort of
    its own), :meth:`requeue` a survivor into the next layer it must run, :meth:`release`
    frees a sequence that left. The runner calls :meth:`decide` until it returns None.

    ``max_wait`` defaults to ``4 * num_layers * (max_in_flight // max_batch_size)``
    layer calls: about four passes of every sequence in flight through every layer.
    ``call_cost``: what a layer call costs beyond its tokens, in tokens (see the module
    docstring); 0 merges only groups whose merge adds no padding. ``max_age``: layer calls
    after its submission from which a sequence is served first (rule 0; None: no such rule).
    """

    def __init__(
        self,
        num_layers: int,
        buckets: ShapeBuckets,
        max_in_flight: int,
        max_wait: int | None = None,
        call_cost: float = 32.0,
        max_age: int | None = None,
    ):
        if not isinstance(max_in_flight, int) or max_in_flight < buckets.max_batch_size:
            raise ValueError(
                f"max_in_flight must be an integer >= max_batch_size={buckets.max_batch_size}, got {max_in_flight!r}"
            )
        if not (isinstance(call_cost, (int, float)) and not isinstance(call_cost, bool) and call_cost >= 0):
            raise ValueError(f"call_cost must be a number >= 0 (tokens), got {call_cost!r}")
        self.num_layers = num_layers
        self.buckets = buckets
        self.max_in_flight = max_in_flight
        self.max_wait = 4 * num_layers * (max_in_flight // buckets.max_batch_size) if max_wait is None else max_wait
        if self.max_wait < 1:
            raise ValueError(f"max_wait must be >= 1, got {self.max_wait!r}")
        self.call_cost = float(call_cost)
        self.aging = None if max_age is None else AgeRule(max_age)
        # groups[layer][cohort]: that cohort's rows waiting for that layer
        self._groups: list[dict[int, _Group]] = [{} for _ in range(num_layers + 1)]
        # every group, oldest first: (layer, cohort) -> group, in the order the groups were made
        self._by_age: dict[tuple[int, int], _Group] = {}
        # cached per layer, None when that layer's groups changed
        self._plans: list[list[_Planned] | None] = [None] * (num_layers + 1)
        self._closed: list[list[_Planned]] = [[] for _ in range(num_layers + 1)]  # each plan's closed calls
        self._cohort_of: dict[int, int] = {}
        self._length_of: dict[int, int] = {}
        self._waiting_in: dict[int, dict[int, int]] = {}  # cohort -> {layer: rows waiting}
        self._cohorts = 0
        self.in_flight = 0
        self.calls = 0
        self._last: tuple[Call, int | None] | None = None  # the last call taken and its cohort (None: merged)
        self._ready: Call | None = None  # the next call, held by advance

    @property
    def wait_bound(self) -> int:
        """The most layer calls a row can wait in one queue."""
        return self.max_wait + self.max_in_flight

    @property
    def room(self) -> int:
        return self.max_in_flight - self.in_flight

    def waiting(self, layer: int) -> int:
        held = len(self._ready.rows) if self._ready is not None and self._ready.layer == layer else 0
        return held + sum(len(group.rows) for group in self._groups[layer].values())

    def cohorts(self, lengths: list[int]) -> list[list[int]]:
        """Positions of ``lengths`` cut into cohorts: sorted by length, consecutive, each a call's capacity."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        out: list[list[int]] = []
        for i in order:
            padded = self.buckets.padded_length(lengths[i])
            if out and len(out[-1]) < self.buckets.capacity(padded):
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def admit(self, rows: list[int], lengths: list[int], submitted: list[int] | None = None) -> None:
        """New sequences (``rows``, of ``lengths`` tokens) enter layer 1, cut into cohorts.
        ``submitted``: each one's submission on the clock :attr:`calls` (default: now)."""
        if self.in_flight + len(rows) > self.max_in_flight:
            raise RuntimeError(f"LayerScheduler.admit: {len(rows)} more rows exceed max_in_flight")
        if self.aging is not None:
            self.aging.entered(rows, [self.calls] * len(rows) if submitted is None else submitted)
        for cohort in self.cohorts(lengths):
            self._new_cohort([rows[i] for i in cohort], [lengths[i] for i in cohort])

    def add(self, row: int, length: int, submitted: int | None = None) -> None:
        """A new sequence of ``length`` tokens enters layer 1, a cohort of its own."""
        if self.in_flight >= self.max_in_flight:
            raise RuntimeError("LayerScheduler.add: max_in_flight sequences are already in flight")
        if self.aging is not None:
            self.aging.entered([row], [self.calls if submitted is None else submitted])
        self._new_cohort([row], [length])

    def _new_cohort(self, rows: list[int], lengths: list[int]) -> None:
        self.buckets.padded_length(min(lengths))  # refuses a length outside 1..max_length: the shortest
        self.buckets.padded_length(max(lengths))  # and the longest bound every other
        cohort = self._cohorts
        self._cohorts += 1
        self.in_flight += len(rows)
        for row, length in zip(rows, lengths):
            self._cohort_of[row] = cohort
            self._length_of[row] = length
        self.requeue_many(rows, 1, lengths)

    def requeue(self, row: int, layer: int, length: int) -> None:
        """``row`` (``length`` tokens) waits for 1-based ``layer``, in its cohort's group there."""
        self.requeue_many([row], layer, [length])

    def requeue_many(self, rows: list[int], layer: int, lengths: list[int]) -> None:
        """:meth:`requeue` of several rows into one layer (in order; one group update per cohort)."""
        self._queue_ready()  # the queues change: the rule decides again
        by_cohort: dict[int, tuple[list[int], list[int]]] = {}
        for row, length in zip(rows, lengths):
            cohort_rows, cohort_lengths = by_cohort.setdefault(self._cohort_of[row], ([], []))
            cohort_rows.append(row)
            cohort_lengths.append(length)
        for cohort, (cohort_rows, cohort_lengths) in by_cohort.items():
            self.buckets.padded_length(min(cohort_lengths))  # refuses a length outside 1..max_length
            padded = self.buckets.padded_length(max(cohort_lengths))  # padding is monotone in the length
            group = self._groups[layer].get(cohort)
            if group is None:
                group = self._groups[layer][cohort] = self._by_age[layer, cohort] = _Group(
                    cohort, [], padded, self.calls
                )
            group.rows.extend(cohort_rows)
            group.rows.sort(key=self._length_of.__getitem__)  # shortest first: a split takes the shortest
            group.longest = max(group.longest, padded)
            counts = self._waiting_in.setdefault(cohort, {})
            counts[layer] = counts.get(layer, 0) + len(cohort_rows)
        self._plans[layer] = None

    def advance(self, call: Call) -> None:
        """Every row of ``call`` goes on to the next layer: :meth:`requeue_many` of them all, or (where
        :meth:`decide` would take exactly those rows next) held as the next call."""
        following = self._following(call)
        if following is None:
            self.requeue_many(list(call.rows), call.layer + 1, [self._length_of[row] for row in call.rows])
        else:
            self._ready = following

    def _following(self, call: Call) -> Call | None:
        """The call :meth:`decide` would return after :meth:`requeue_many` of ``call``'s rows into the next
        layer, where that needs no queue: ``call`` was the last call taken, one cohort with no other row
        waiting, full (no group could join it: closed), nothing waits at the next layer or deeper (so it
        is the deepest closed call) and no group is overdue. Else None."""
        layer = call.layer + 1
        if layer > self.num_layers or self._last is None or self._last[0] is not call:
            return None
        cohort = self._last[1]
        if cohort is None or self._waiting_in.get(cohort) or len(call.rows) < self.buckets.capacity(call.padded_length):
            return None
        if any(self._groups[deeper] for deeper in range(layer, self.num_layers + 1)):
            return None
        oldest = self._oldest()
        if oldest is not None and self.calls - oldest[1].since >= self.max_wait:
            return None
        return Call(layer, call.padded_length, call.rows, call.padded_rows)

    def _queue_ready(self) -> None:
        """The call held by :meth:`advance`, back into its queue as a group (its rows are to change)."""
        ready, self._ready = self._ready, None
        if ready is not None:
            self.requeue_many(list(ready.rows), ready.layer, [self._length_of[row] for row in ready.rows])

    def release(self, row: int) -> None:
        """``row`` left the encoder."""
        self.release_many([row])

    def release_many(self, rows: list[int]) -> None:
        """``rows`` left the encoder."""
        self.in_flight -= len(rows)
        for row in rows:
            self._forget(row)
        if self.aging is not None:
            self.aging.left(rows)

    def _forget(self, row: int) -> None:
        cohort = self._cohort_of.pop(row)
        del self._length_of[row]
        counts = self._waiting_in.get(cohort)
        if counts is not None and not counts:
            del self._waiting_in[cohort]

    def discard(self, rows) -> int:
        """Remove waiting ``rows`` (e.g. a client went away) and release them; returns how many were found."""
        rows = set(rows)
        if self._ready is not None and rows.intersection(self._ready.rows):
            self._queue_ready()
        found = []
        for layer, groups in enumerate(self._groups):
            for cohort, group in list(groups.items()):
                kept = [row for row in group.rows if row not in rows]
                if len(kept) == len(group.rows):
                    continue
                found += [row for row in group.rows if row in rows]
                self._waiting_in[cohort][layer] -= len(group.rows) - len(kept)
                if not self._waiting_in[cohort][layer]:
                    del self._waiting_in[cohort][layer]
                if kept:
                    group.rows = kept
                    group.longest = max(self.buckets.padded_length(self._length_of[row]) for row in kept)
                else:
                    del groups[cohort], self._by_age[layer, cohort]
                self._plans[layer] = None
        self.release_many(found)
        return len(found)

    # ------------------------------------------------------------------ deciding

    def decide(self, can_admit: bool, oldest_pending: int | None = None) -> Call | Admit | None:
        """The next action: a :class:`Call`, an :class:`Admit` (only with ``can_admit``), or None when idle.

        ``oldest_pending``: the submission (on the clock :attr:`calls`) of the earliest sequence
        pending, for rule 0; the admission must then take the overdue ones first."""
        if self.aging is not None:
            overdue = self.aging.next_overdue(self.calls, oldest_pending if can_admit else None, self.room)
            if overdue == ADMIT_OVERDUE:
                return Admit(self._admit_count())
            if overdue is not None and (self._ready is None or overdue not in self._ready.rows):
                self._queue_ready()
                return self._call_holding(overdue)
        if self._ready is not None:  # held by advance: what the rule takes next
            call, self._ready = self._ready, None
            self.calls += 1
            self._last = (call, self._last[1])
            return call
        layers = [layer for layer in range(self.num_layers, 0, -1) if self._groups[layer]]
        full_cohort = self.buckets.max_batch_size
        if not layers:
            return Admit(self._admit_count()) if can_admit and self.room > 0 else None
        oldest_layer, oldest = self._oldest()
        if self.calls - oldest.since >= self.max_wait:
            planned = next(p for p in self._plan(oldest_layer) if oldest in p.groups)
            return self._take(oldest_layer, planned)
        for layer in layers:
            closed = [p for p in self._closed_plan(layer) if not self._waits_below(p, layer)]
            if closed:
                return self._take(layer, max(closed, key=lambda p: p.rows))  # max keeps the first on ties
        if can_admit and self.room >= full_cohort:
            return Admit(self._admit_count())
        layer = layers[0] if can_admit else layers[-1]
        return self._take(layer, max(self._plan(layer), key=lambda p: p.rows))

    def _call_holding(self, row: int) -> Call:
        """The planned call that holds ``row`` (waiting in one of its cohort's groups), taken."""
        cohort = self._cohort_of[row]
        layer, group = next(
            (at, self._groups[at][cohort]) for at in self._waiting_in[cohort] if row in self._groups[at][cohort].rows
        )
        index = group.rows.index(row)
        return self._take(
            layer, next(p for p in self._plan(layer) if any(g is group and a <= index < b for g, a, b in p.parts))
        )

    def _oldest(self) -> tuple[int, _Group] | None:
        """The group waiting longest and its layer (the deepest of those made at the same call), or None."""
        first = None
        for (layer, _), group in self._by_age.items():  # groups made at one call are consecutive here
            if first is None:
                first = (layer, group)
            elif group.since != first[1].since:
                break
            elif layer > first[0]:
                first = (layer, group)
        return first

    def _admit_count(self) -> int:
        """The room, in whole cohorts where there is room for one."""
        size = self.buckets.max_batch_size
        return self.room - self.room % size if self.room >= size else self.room

    def _cost(self, rows: int, padded_length: int) -> float:
        return self.call_cost + rows * padded_length

    def _plan(self, layer: int) -> list[_Planned]:
        """The calls of ``layer``: its groups in length order, packed greedily; cached until it changes.

        A group joins the call before it where the merge fits and costs no more than the two
        apart. Where it does not fit, its shortest rows fill that call when that costs no more
        than the call and the group apart (the rest of the group, its longest rows, starts the
        next call): the calls of a layer then hold as many rows as they can, and fewer calls
        run the same rows."""
        if self._plans[layer] is not None:
            return self._plans[layer]
        groups = sorted(self._groups[layer].values(), key=lambda g: (g.longest, g.since, g.cohort))
        plan: list[_Planned] = []
        for group in groups:
            rows = len(group.rows)
            if plan:
                last = plan[-1]
                merged_rows = last.rows + rows
                merged_length = max(last.padded_length, group.longest)
                apart = self._cost(last.rows, last.padded_length) + self._cost(rows, group.longest)
                if merged_rows <= self.buckets.capacity(merged_length):
                    if self._cost(merged_rows, merged_length) <= apart:
                        last.parts.append((group, 0, rows))
                        last.rows, last.padded_length = merged_rows, merged_length
                        continue
                else:
                    filled = self._fill(last, group, apart)
                    if filled:
                        last.parts.append((group, 0, filled))
                        last.rows += filled
                        last.padded_length = max(last.padded_length, self._padded_of(group.rows[filled - 1]))
                        last.closed = True
                        plan.append(_Planned([(group, filled, rows)], rows - filled, group.longest, False))
                        continue
                last.closed = True  # a later group could not join it
            plan.append(_Planned([(group, 0, rows)], rows, group.longest, False))
        for planned in plan:
            if planned.rows >= self.buckets.capacity(planned.padded_length):
                planned.closed = True
        self._plans[layer] = plan
        self._closed[layer] = [planned for planned in plan if planned.closed]
        return plan

    def _closed_plan(self, layer: int) -> list[_Planned]:
        """The closed calls of :meth:`_plan`, made with it."""
        self._plan(layer)
        return self._closed[layer]

    def _padded_of(self, row: int) -> int:
        return self.buckets.padded_length(self._length_of[row])

    def _fill(self, last: _Planned, group: _Group, apart: float) -> int:
        """How many of ``group``'s shortest rows fill ``last`` to its capacity at no more cost than
        the two apart (the rest of the group a call of its own); 0 where none do."""
        for count in range(min(len(group.rows) - 1, self.buckets.max_batch_size - last.rows), 0, -1):
            length = max(last.padded_length, self._padded_of(group.rows[count - 1]))
            if last.rows + count > self.buckets.capacity(length):
                continue
            split = self._cost(last.rows + count, length) + self._cost(len(group.rows) - count, group.longest)
            return count if split <= apart else 0
        return 0

    def _waits_below(self, planned: _Planned, layer: int) -> bool:
        """Whether a cohort of ``planned`` has rows waiting at a shallower layer (which may still join it)."""
        for group in planned.groups:
            if any(at < layer for at in self._waiting_in.get(group.cohort, ())):
                return True
        return False

    def _take(self, layer: int, planned: _Planned) -> Call:
        rows: list[int] = []
        for group, start, stop in planned.parts:
            taken, group.rows = group.rows[start:stop], group.rows[:start] + group.rows[stop:]
            if group.rows:  # split: the rest waits on
                group.longest = self._padded_of(group.rows[-1])
            else:
                del self._groups[layer][group.cohort], self._by_age[layer, group.cohort]
            counts = self._waiting_in[group.cohort]
            counts[layer] -= len(taken)
            if not counts[layer]:
                del counts[layer]
            rows += taken
        rows.sort(key=lambda row: self._length_of[row])
        self._plans[layer] = None
        self.calls += 1
        call = Call(layer, planned.padded_length, tuple(rows), self.buckets.padded_rows(len(rows)))
        self._last = (call, planned.parts[0][0].cohort if len(planned.parts) == 1 else None)
        return call
