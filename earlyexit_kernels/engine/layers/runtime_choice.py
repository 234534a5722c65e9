"""Which runtime runs the int8 layers on this CPU, chosen by timing them on the user's own rows.

    choice = choose_int8_layers(model, batches, reference=float_model)
    choice.recipe     # "per-token-ort", "per-token-ov" or "per-token": the layers the certificate is then made on
    choice.reason     # one line: each runtime's time, and why this one

Why: the per-token int8 quantization (one activation scale per token, one weight scale per output channel) runs
on three runtimes' kernels (:data:`~earlyexit_kernels.engine.layers.precision.INT8_LAYERS`): ONNX Runtime's
``DynamicQuantizeMatMul``, OpenVINO's oneDNN brgemm and PyTorch's fbgemm. Which is fastest depends on the CPU:
OpenVINO's layers were 1.3-1.7x ONNX Runtime's on an AMX Xeon (``benchmarks/results/intel_xeon/ov_layer_cpu.md``)
and 0.96-1.36x with oneDNN capped to AVX-512 VNNI. A family's recipe is one guess for every CPU; this times the
installed runtimes on the machine that fits and serves.

How: each candidate is the model with its encoder on that runtime
(:func:`~earlyexit_kernels.engine.layers.precision.int8_encoder`); one untimed pass over ``batches`` each (shapes
compiled, caches warm), then up to ``rounds`` rounds, each timing the default and every candidate still in over
all of ``batches`` and over the first :data:`SINGLE_ROWS` of their rows called one at a time, at full depth (the
model's own forward, exit heads included), the order rotated every round so none always runs first. The single
rows are single-text traffic: a runtime with a fixed cost per call can win the batches and lose there (the static
int8 layers on the Intel Xeon with AMX served single texts at 0.63-0.78x ONNX Runtime's layers, docs/serving.md),
and a folder is fitted once for whatever it serves. Where the user knows what it serves (``eek fit --traffic``,
:data:`TRAFFIC`), the race times those calls alone: ``batches`` for a corpus (``eek classify``) or requests of many
texts, ``texts`` for requests of one text; ``both`` (the default) asks a runtime to win on both. The family's
recipe (``default``) stays unless another candidate is faster on the calls timed in at least :func:`wins_needed`
of the ``rounds`` (:data:`ROUNDS`: 10 of 12), the fewest wins that a candidate no faster than the default reaches
with probability under 5% (a one-sided sign test), so a difference inside the timings' noise never moves the choice. A first rule asked for a win in every
one of 5 rounds (p = 1/32): on a shared 2-core machine, whose timings move by a tenth from one second to the next,
one round lost to such a burst kept a clearly slower runtime; here a candidate may lose two rounds of twelve. A
candidate is out as soon as it can no longer reach the wins it needs, and the timing stops when every candidate
left has them or none is left (on a CPU where the default is fastest, after three rounds); stopping early for
either never changes what the full rounds would decide. Among the candidates with the wins, the lowest sum of the
two medians wins.

Agreement: every candidate computes the same quantization, so their answers differ from each other only by float
rounding and by what the CPU's int8 sums do. Where ``reference`` (the float32 model) is given, each candidate's
full-depth answers on the timed rows are compared with it; a candidate that changes significantly more answers
than the default (an exact one-sided binomial test on the rows where exactly one of the two changed the
answer, p < 0.05) is not chosen, however fast. The certificate is then made on the chosen layers, as on any int8
base: the agreement it states is that layers'.

The rows are ones the fit trains on, never ones that certify (the choice depends on what they showed).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from earlyexit_kernels.engine.layers.int8_isa import int8_isa
from earlyexit_kernels.engine.layers.ov_layer import SNIPPETS_OFF

__all__ = [
    "ROUNDS",
    "TRAFFIC",
    "EXIT_GRAPH_CANDIDATES",
    "LAYER_LOOP",
    "GraphSettingsChoice",
    "LayersChoice",
    "Race",
    "candidate_recipes",
    "choose_int8_layers",
    "changed_answers_worse",
    "choose_exit_graph_settings",
    "graph_on",
    "timed_race",
    "use_exit_graph_settings",
    "wins_needed",
]

#: rounds of alternating timings at most: a candidate moves the choice by winning :func:`wins_needed` of them
ROUNDS = 12
#: the one-sided level of the sign test a candidate's wins over the default must pass to move the choice
_SPEED_LEVEL = 0.05
#: the one-sided level at which a candidate's extra changed answers over the default's refuse it
_AGREEMENT_LEVEL = 0.05
#: rows of the timed batches also timed one at a time each round: the calls of single-text traffic
SINGLE_ROWS = 16
#: the traffic a folder is fitted for (``eek fit --traffic``, whose help says each): the calls its int8 runtimes are
#: timed on, batches and single texts (a runtime chosen only where faster on both), or either alone
TRAFFIC = ("both", "batches", "texts")


@dataclass
class LayersChoice:
    """The int8 layers chosen on this CPU (``recipe``) and the measurement that chose them.

    ``seconds``: each candidate recipe's time per round over the timed batches; ``single_seconds``: over
    ``single_rows`` of their rows called one at a time (:data:`SINGLE_ROWS`); ``changed``: each
    candidate's full-depth answers that differ from the float32 model's on the timed rows (empty where no
    reference was given); ``rows``: how many rows were timed; ``cpu``: this CPU's int8 class
    (:func:`~earlyexit_kernels.engine.layers.int8_isa.int8_isa`); ``default``: the family's recipe, kept
    unless beaten; ``reason``: one line saying what was picked and why; ``by``: ``"timed"``, or ``"only"``
    where one runtime is installed (nothing timed)."""

    recipe: str
    default: str
    reason: str
    by: str = "timed"
    cpu: str = field(default_factory=int8_isa)
    rows: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)
    single_rows: int = 0
    single_seconds: dict[str, list[float]] = field(default_factory=dict)
    #: the calls timed (:data:`TRAFFIC`): ``"both"``, ``"batches"`` or ``"texts"``
    traffic: str = "both"
    #: the static int8 layers that ran where ``recipe`` is set on calibration rows (kept for the folder to save;
    #: not recorded in ``eek_fit.json``)
    static_layers: list | None = field(default=None, repr=False, compare=False)
    #: on the static layers, the plugin's options their exit graph runs with (:func:`choose_exit_graph_settings`)
    exit_graph: GraphSettingsChoice | None = None

    def as_dict(self) -> dict:
        """What a folder records of the choice (``eek_fit.json``'s ``int8_layers``)."""
        saved = {"recipe": self.recipe, "by": self.by, "cpu": self.cpu, "default": self.default, "reason": self.reason}
        if self.seconds:
            saved["rows"] = self.rows
            saved["seconds"] = {name: [round(s, 6) for s in times] for name, times in self.seconds.items()}
        if self.single_seconds:
            saved["single_rows"] = self.single_rows
            saved["single_seconds"] = {n: [round(s, 6) for s in times] for n, times in self.single_seconds.items()}
        if self.changed:
            saved["changed_answers"] = dict(self.changed)
        if self.traffic != "both":  # a record without it timed both, as every folder did before the option
            saved["traffic"] = self.traffic
        if self.exit_graph is not None:
            saved["exit_graph_settings"] = self.exit_graph.as_dict()
        return saved


def candidate_recipes(default: str, *, calibrated: bool = False) -> list[str]:
    """The int8 recipes whose runtime is installed here, ``default`` first (each runtime once); the ones set on
    calibration rows (static int8) only where ``calibrated`` (rows to set them on were given)."""
    from earlyexit_kernels.engine.layers.precision import CALIBRATED_RECIPES, INT8_LAYERS, runnable_int8_recipe

    found = [default] + [recipe for recipe in INT8_LAYERS.values() if recipe != default]
    return [
        recipe
        for recipe in dict.fromkeys(found)
        if runnable_int8_recipe(recipe)[1] is None and (calibrated or recipe not in CALIBRATED_RECIPES)
    ]


def _upper_tail(successes: int, trials: int) -> float:
    """P(X >= ``successes``) for X ~ Binomial(``trials``, 1/2)."""
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2**trials


def wins_needed(rounds: int, level: float = _SPEED_LEVEL) -> int | None:
    """The fewest of ``rounds`` alternating rounds a candidate must be faster than the default in to be chosen:
    the smallest ``k`` that a candidate no faster than the default reaches with probability under ``level`` (a
    one-sided sign test); None where even all ``rounds`` would not (fewer than 5 at 5%)."""
    return next((k for k in range(rounds + 1) if _upper_tail(k, rounds) < level), None)


def changed_answers_worse(candidate: list[bool], default: list[bool], level: float = _AGREEMENT_LEVEL) -> bool:
    """Whether ``candidate`` changes significantly more answers than ``default`` (each a flag per row: the answer
    differs from the float32 model's): an exact one-sided binomial test on the discordant rows (changed by one of
    the two only), p < ``level``. Rows both changed, or neither, say nothing about which is worse."""
    if len(candidate) != len(default):
        raise ValueError(f"the flags cover {len(candidate)} and {len(default)} rows; give both on the same rows")
    only_candidate = sum(c and not d for c, d in zip(candidate, default))
    discordant = only_candidate + sum(d and not c for c, d in zip(candidate, default))
    if only_candidate == 0:
        return False
    # the chance of this many or more if neither is worse
    return _upper_tail(only_candidate, discordant) < level


#: the keys of a batch that are the model's inputs (a fit's batches also carry ``rows`` and ``labels``)
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _inputs(batch: dict) -> dict:
    return {name: value for name, value in batch.items() if name in _INPUTS}


def _answers(model: nn.Module, batches: list[dict]) -> list[int]:
    """The full-depth class of every row of ``batches``, in order."""
    answers: list[int] = []
    with torch.inference_mode():
        for batch in batches:
            answers += model(**_inputs(batch)).logits.argmax(-1).tolist()
    return answers


def _single_rows(batches: list[dict], count: int = SINGLE_ROWS) -> list[dict]:
    """The first ``count`` rows of ``batches``, each a batch of its own without its padding (the positions its mask
    keeps, whichever side the tokenizer padded): what a server calls the layers with for one text."""
    rows = []
    for batch in batches:
        inputs = _inputs(batch)
        mask = inputs.get("attention_mask")
        for index in range(len(inputs["input_ids"])):
            if len(rows) == count:
                return rows
            keep = slice(None) if mask is None else mask[index].bool()
            rows.append({name: value[index][keep][None] for name, value in inputs.items()})
    return rows


def _seconds(model: nn.Module, batches: list[dict]) -> float:
    inputs = [_inputs(batch) for batch in batches]
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in inputs:
            model(**batch)
    return time.perf_counter() - start


def choose_int8_layers(
    model: nn.Module,
    batches: list[dict],
    *,
    default: str,
    reference: nn.Module | None = None,
    rounds: int = ROUNDS,
    calibration: list[dict] | None = None,
    traffic: str = "both",
) -> LayersChoice:
    """Time the int8 layers of every installed runtime on ``batches`` (dicts of the model's inputs:
    ``input_ids``, ``attention_mask``, ...) and choose one (the module docstring). ``model`` (float32) is left
    as it is; ``default``: the family's recipe, kept unless another wins enough rounds; ``reference``: the
    float32 model whose full-depth answers the candidates' are compared with (None: no agreement check);
    ``calibration``: the batches the static int8 layers set their scales on (None: static int8 is no candidate).
    The timed batches and the calibration batches are training rows; a static candidate's agreement is read on
    the timed rows, which may be among its calibration rows (as its scales were set on the training split).
    ``traffic`` (:data:`TRAFFIC`): the calls timed, the batches and their first rows one at a time (``"both"``), or
    either alone."""
    from earlyexit_kernels.engine.layers.precision import int8_encoder

    if traffic not in TRAFFIC:
        raise ValueError(
            f"traffic must be one of {', '.join(TRAFFIC)} (the calls the runtimes are timed on), got {traffic!r}"
        )

    needed = wins_needed(rounds)
    if needed is None:
        fewest = next(n for n in range(1, 64) if wins_needed(n) is not None)
        raise ValueError(
            f"rounds must be at least {fewest}: in fewer, a runtime no faster than the family's wins every round "
            f"too often to tell it apart (a sign test at {_SPEED_LEVEL:.0%}); got {rounds}"
        )
    if not batches:
        raise ValueError("the runtimes are timed on rows: give at least one batch")
    recipes = candidate_recipes(default, calibrated=bool(calibration))
    if default not in recipes:
        raise ValueError(f"the default int8 recipe {default} cannot run here: its runtime is not installed")
    if len(recipes) == 1:
        return LayersChoice(default, default, f"int8 layers: {_runtime(default)}, the one runtime installed", by="only")
    rows = sum(len(batch["input_ids"]) for batch in batches)
    singles = [] if traffic == "batches" else _single_rows(batches)
    # copies: model stays float32
    candidates = {recipe: int8_encoder(model, recipe, calibration=calibration) for recipe in recipes}
    changed: dict[str, list[bool]] = {}
    expected = None if reference is None else _answers(reference, batches)
    for recipe, candidate in candidates.items():  # the untimed pass: shapes compiled, and the answers
        answers = _answers(candidate, batches)
        if expected is not None:
            changed[recipe] = [a != b for a, b in zip(answers, expected)]
    refused = {r for r in recipes if r != default and changed and changed_answers_worse(changed[r], changed[default])}
    for candidate in candidates.values() if singles else ():  # and the single rows' shapes
        _seconds(candidate, singles)
    alive = [recipe for recipe in recipes if recipe != default and recipe not in refused]
    if traffic == "texts":  # the single rows are what is timed, in the race's place of the batches
        race = timed_race(candidates, default, alive, singles, [], rounds)
        seconds, single = {}, race.seconds
    else:
        race = timed_race(candidates, default, alive, batches, singles, rounds)
        seconds, single = race.seconds, race.single
    del candidates
    wins, timed, faster = race.wins, race.timed, race.faster

    def total(recipe: str) -> float:  # the two medians' sum, of the calls timed
        return sum(statistics.median(times[recipe]) for times in (seconds, single) if times.get(recipe))

    chosen = min(faster, key=total, default=default)
    timings = ({r: t for r, t in seconds.items() if t}, {r: t for r, t in single.items() if t})
    counts = (wins.get(chosen, 0), timed, needed, rounds)
    timed_rows = (rows if traffic != "texts" else 0, len(singles))
    return LayersChoice(
        chosen,
        default,
        _reason(chosen, default, timings, refused, timed_rows, counts, cpu := int8_isa()),
        cpu=cpu,
        rows=timed_rows[0],
        seconds=timings[0],
        changed={recipe: sum(flags) for recipe, flags in changed.items()},
        single_rows=len(singles),
        single_seconds=timings[1],
        traffic=traffic,
    )


@dataclass
class Race:
    """Alternating timings of candidates against a default (:func:`timed_race`): each one's seconds per round over
    the batches (``seconds``) and the single rows (``single``), each candidate's rounds won, the rounds timed, the
    wins a candidate needed, and the candidates that have them (``faster``)."""

    seconds: dict[str, list[float]]
    single: dict[str, list[float]]
    wins: dict[str, int]
    timed: int
    needed: int
    faster: list[str]


def timed_race(models: dict, default: str, candidates: list[str], batches, singles, rounds: int = ROUNDS) -> Race:
    """Time ``models`` (by name; each already run once on ``batches`` and ``singles``, so shapes are prepared) in
    up to ``rounds`` rounds, the order rotated every round: ``default`` and every one of ``candidates`` still in,
    over all of ``batches`` and over the single rows ``singles`` (none: the batches alone decide), at the models'
    own forward. A candidate wins a round where it is faster on both, and stays in while it can still win
    :func:`wins_needed` of ``rounds`` (a folder serves either); the timing stops once every candidate left has its
    wins or none is left (most CPUs: after rounds - needed + 1 rounds), which never changes what the full rounds
    would decide."""
    needed = wins_needed(rounds)
    if needed is None:
        raise ValueError(f"{rounds} rounds cannot tell a faster candidate apart (a sign test at {_SPEED_LEVEL:.0%})")
    alive = list(candidates)
    seconds: dict[str, list[float]] = {name: [] for name in (default, *candidates)}
    single: dict[str, list[float]] = {name: [] for name in (default, *candidates)}
    wins = dict.fromkeys(alive, 0)
    timed = 0
    while timed < rounds and any(wins[name] < needed for name in alive):
        order = [default, *alive]
        shift = timed % len(order)
        for name in order[shift:] + order[:shift]:
            seconds[name].append(_seconds(models[name], batches))
            if singles:
                single[name].append(_seconds(models[name], singles))
        timed += 1
        for name in alive:
            faster_singles = not singles or single[name][-1] < single[default][-1]
            wins[name] += seconds[name][-1] < seconds[default][-1] and faster_singles
        alive = [name for name in alive if wins[name] + rounds - timed >= needed]
    return Race(seconds, single, wins, timed, needed, [name for name in alive if wins[name] >= needed])


#: the CPU plugin's options tried for the static layers' exit graph beside the layers' own, by name: its code
#: generation for fused subgraphs (the attention, chains of element-wise operations) off. On the Intel Xeon with AMX
#: the exit graph of MiniLM-L6 RT's static layers, on its grid padded to multiples of 8 (as it runs now), ran 4-11%
#: faster so on calls of 32 texts (docs/benchmarks.md, "the exit graph's compilation"); the stack benchmark's OpenVINO
#: peer is compiled at the faster of the two on the machine for the same reason. Another CPU may differ, so
#: ``eek fit`` times them there.
EXIT_GRAPH_CANDIDATES = {"fused-subgraph code generation off": (SNIPPETS_OFF,)}
#: the candidate that runs the layers one call each, beside the exit graph's compilations: the exact loop
#: (:mod:`~earlyexit_kernels.engine.step.batch_loop`), whose calls the graph's fixed cost a call does not weigh on. On
#: the AVX-512 AMD EPYC the loop's time over the graph's was 0.65-0.89 at every call size from 1 to 32 texts (MiniLM-L6
#: RT, one thread; ``benchmarks/results/amd_epyc/exit_graph_call_size_cpu.json``), where on the Intel Xeon with AMX the
#: graph won from 8 texts a call (:data:`~earlyexit_kernels.engine.step.ov_exit_graph.GRAPH_MIN_POSITIONS`), so
#: ``eek fit`` times the two on the CPU it fits on.
LAYER_LOOP = "the layer loop"


@dataclass
class GraphSettingsChoice:
    """The plugin's options chosen for the exit graph (``settings``: pairs of option and value, empty for the
    layers' own; ``name``: the candidate's, or ``"default"``), the timings that chose them, and each candidate the
    plugin would not compile with its reason (``refused``)."""

    settings: tuple
    name: str
    reason: str
    seconds: dict[str, list[float]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    #: False where :data:`LAYER_LOOP` was timed faster: the layers then run one call each, never the graph
    graph: bool = True

    def as_dict(self) -> dict:
        saved = {"settings": dict(self.settings), "name": self.name, "reason": self.reason, "graph": self.graph}
        if self.seconds:
            saved["seconds"] = {name: [round(s, 6) for s in times] for name, times in self.seconds.items()}
        if self.refused:
            saved["refused"] = dict(self.refused)
        return saved


def use_exit_graph_settings(model: nn.Module, settings: tuple, graph: bool = True) -> None:
    """The exit graph of ``model`` (on static int8 layers) compiled with ``settings`` from its next call on; with
    ``graph`` False its layers run one call each instead (the exact loop), the graph never built."""
    from earlyexit_kernels.engine.layers.ort_layer import encoder_layers
    from earlyexit_kernels.engine.layers.ov_static import set_exit_graph_choice

    set_exit_graph_choice(encoder_layers(model), settings, graph)


def graph_on(model: nn.Module) -> None:
    """``model``'s exit graph run again where ``eek fit`` chose the layer loop (its compilation options kept): for the
    benchmarks that read the graph itself."""
    from earlyexit_kernels.engine.layers.ort_layer import encoder_layers

    use_exit_graph_settings(model, encoder_layers(model)[0].exit_graph_settings, graph=True)


def choose_exit_graph_settings(
    model: nn.Module, batches: list[dict], graph_of, *, rounds: int = ROUNDS
) -> GraphSettingsChoice:
    """Time ``model`` (patched, on the static int8 layers, at its policy) with its exit graph compiled with the
    layers' options, with each of :data:`EXIT_GRAPH_CANDIDATES` over them, and with no graph (:data:`LAYER_LOOP`: the
    layers one call each), on ``batches`` (training rows), by :func:`timed_race`'s rule on the batches alone (single
    texts run the layers one call each, never the graph): a candidate is chosen only where it is faster in
    :func:`wins_needed` of ``rounds``. ``model`` is left as it is (each setting times its own copy). The same
    computation every way, the plugin's code for it chosen otherwise (the loop's decisions are the graph's up to the
    float rounding of the heads, :mod:`~earlyexit_kernels.engine.step.ov_exit_graph`).
    A candidate the plugin refuses to compile is left out with its reason. ``graph_of(model)``: a model's exit
    graph, or None where it does not run its policy or heads (the caller reads them from the patched model:
    :func:`~earlyexit_kernels.engine.step.ov_exit_graph.exit_graph` of its adapter, heads and policy)."""
    from earlyexit_kernels.engine.layers.ov_static import STATIC_RECIPE

    if getattr(model, "eek_int8_recipe", None) != STATIC_RECIPE or getattr(model, "early_exit_heads", None) is None:
        raise ValueError("the exit graph's settings are chosen for a patched model on the static int8 layers")
    if not batches:
        raise ValueError("the exit graph's settings are timed on rows: give at least one batch")
    inputs = [_inputs(batch) for batch in batches]
    models, refused = {}, {}
    for name, settings in {"default": (), **EXIT_GRAPH_CANDIDATES}.items():
        copied = copy.deepcopy(model)
        use_exit_graph_settings(copied, settings)
        graph = graph_of(copied)
        if graph is None:  # a policy or heads the graph does not run: nothing to choose
            return GraphSettingsChoice((), "default", "the exit graph does not run this policy or these heads")
        try:  # compiled here, where a failure raises (a call would run the layers one call each instead)
            graph.compiled()
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]  # the plugin's words last
            refused[name] = lines[-1][:200] if lines else type(error).__name__
            continue
        _seconds(copied, inputs)  # the untimed pass: shapes prepared
        models[name] = copied
    if "default" not in models:
        raise RuntimeError(f"OpenVINO could not compile the exit graph: {refused['default']}")
    loop = copy.deepcopy(model)
    use_exit_graph_settings(loop, (), graph=False)
    _seconds(loop, inputs)
    models[LAYER_LOOP] = loop
    race = timed_race(models, "default", [n for n in models if n != "default"], inputs, [], rounds)
    del models
    chosen = min(race.faster, key=lambda n: statistics.median(race.seconds[n]), default=None)
    rows = sum(len(batch["input_ids"]) for batch in inputs)
    timings = ", ".join(f"{n} {statistics.median(t) * 1e3:.0f} ms" for n, t in race.seconds.items() if t)
    measured = f"{rows} rows in batches at the fitted policy, the median of {race.timed} rounds: {timings}"
    if chosen is None:
        reason = f"the exit graph: the layers' settings, no other faster in {race.needed} of {rounds} rounds"
        chosen, settings = "default", ()
    elif chosen == LAYER_LOOP:
        reason = f"no exit graph: {LAYER_LOOP}, faster than the graph in {race.wins[chosen]} of {race.timed} rounds"
        settings = ()
    else:
        reason = f"the exit graph: {chosen}, faster in {race.wins[chosen]} of {race.timed} rounds"
        settings = EXIT_GRAPH_CANDIDATES[chosen]
    if refused:
        reason += "; " + "; ".join(f"{name} refused by the plugin ({why})" for name, why in refused.items())
    seconds = {n: t for n, t in race.seconds.items() if t}
    return GraphSettingsChoice(
        settings, chosen, f"{reason} ({measured})", seconds=seconds, refused=refused, graph=chosen != LAYER_LOOP
    )


def _runtime(recipe: str) -> str:
    from earlyexit_kernels.engine.layers.precision import INT8_LAYERS

    return next((name for name, made in INT8_LAYERS.items() if made == recipe), recipe)


def _reason(chosen: str, default: str, timings: tuple, refused, rows: tuple, counts: tuple, cpu: str) -> str:
    """``timings``: each recipe's seconds per round on the batches and on the single rows; ``rows``: how many of
    each were timed (0: that traffic was not); ``counts``: the chosen candidate's wins, the rounds timed, the
    wins needed and the rounds at most."""
    (batched, single), (rows, singles) = timings, rows
    won, timed, needed, rounds = counts
    kinds = [times for times in (batched, single) if times]
    ranked = sorted(kinds[0], key=lambda r: statistics.median(kinds[0][r])) if kinds else []  # none raced
    times = ", ".join(
        f"{_runtime(r)} " + " / ".join(f"{statistics.median(t[r]) * 1e3:.0f}" for t in kinds) + " ms" for r in ranked
    )
    spent = f"{timed} round" + ("s" if timed != 1 else "")
    calls = " / ".join(
        ([f"{rows} rows in batches"] if rows else [])
        + ([f"{singles}{' of them' if rows else ' rows'} one at a time"] if singles else [])
    )
    measured = f"{calls}, at full depth on this {cpu} CPU, the median of {spent}: {times}"
    if chosen != default:
        return f"int8 layers: {_runtime(chosen)}, faster than {_runtime(default)} in {won} of {spent} ({measured})"
    if rows and singles:
        where = "on both the batches and the single rows"
    else:
        where = "on the batches" if rows else "one row at a time"
    why = f"no other runtime was faster {where} in {needed} of {rounds} rounds (a sign test at {_SPEED_LEVEL:.0%})"
    if refused:
        why += f"; {', '.join(_runtime(r) for r in sorted(refused))} changed significantly more answers"
    return f"int8 layers: {_runtime(default)}, the family's: {why} ({measured})"
