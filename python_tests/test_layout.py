"""The package's layout: subpackages in layers, no import cycles, the public names where users find them.

Imports are read from the source (every ``import`` statement, those inside functions
too), so a cycle that only a lazy import hides is found as well.
"""

import ast
import importlib
from pathlib import Path

import pytest

import earlyexit_kernels as eek

PACKAGE_DIR = Path(eek.__file__).resolve().parent
ROOT = "earlyexit_kernels"

#: each subpackage and the layer it sits in; a module imports (at import time or lazily, inside
#: a function) only from its own layer or the ones below
LAYERS = {
    "methods": 0,
    "calibration": 1,
    "backends": 2,
    "engine": 3,
    "models": 4,
    "patching": 5,
    "training": 6,
    "integrations": 7,
    "demo": 8,
    "bench": 9,
}
#: modules directly in the package folder that sit below every layer (any module may import them); _fit_fields:
#: the fit settings' command-line metadata, free of torch, that fields in calibration/, training/ and integrations/
#: carry, as _method_names is the methods' names
BOTTOM_MODULES = {"_version", "_method_names", "_fit_fields"}
#: what may sit directly in the package folder: the facade, ``python -m earlyexit_kernels``,
#: ``earlyexit_kernels.ray`` (the public name of the Ray Data integration) and the bottom modules
TOP_LEVEL_MODULES = {"__init__", "__main__", "ray", *BOTTOM_MODULES}
#: what ``calibration/`` never imports: it is tensor code over recorded logits, and running a model,
#: patching one, training heads or reading folders is done above it
CALIBRATION_NEVER_IMPORTS = ("training", "engine", "patching", "integrations")


def module_name(path: Path) -> str:
    parts = [ROOT, *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}


def imports_of(path: Path, *, lazy: bool, text: str | None = None) -> set[str]:
    """The package's modules that ``path`` imports, with the packages whose ``__init__`` that runs.

    ``lazy=False``: only the imports that run when the module is imported (not those inside
    functions or classes' methods). ``text``: read in place of the file's own (for tests of this test).
    An import of the facade itself (``from earlyexit_kernels import x``) gives the root's name.
    """
    tree = ast.parse(path.read_text() if text is None else text)
    current = module_name(path)
    is_package = path.name == "__init__.py"
    statements = ast.walk(tree) if lazy else tree.body
    found = set()
    explicit_root = False
    for node in statements:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = current.split(".") if is_package else current.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == ROOT:  # the facade itself: above every layer
                explicit_root = True
            if target in MODULES:
                parts = target.split(".")
                # importing a.b.c runs the __init__ of a.b too (the root's is the facade, left out)
                found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # a module's own packages have run their __init__ before it runs: no edge to them
    ancestors = {".".join(current.split(".")[:i]) for i in range(1, current.count(".") + 2)}
    modules = {m for m in found if m in MODULES and m not in ancestors}
    return modules | {ROOT} if explicit_root else modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in BOTTOM_MODULES:
        return -1
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_an_import_of_the_facade_is_an_arrow_up():
    """``from earlyexit_kernels import x`` inside the package reaches above every layer; ``_version`` is below them."""
    report = MODULES["earlyexit_kernels.demo.report"]
    lazy_facade = "def f():\n    from earlyexit_kernels import __version__\n"
    assert ROOT in imports_of(report, lazy=True, text=lazy_facade)
    assert ROOT not in imports_of(report, lazy=False, text=lazy_facade)
    assert layer_of(ROOT) is None  # so the layer test reports it as upward
    bottom = "from earlyexit_kernels._version import __version__\n"
    assert imports_of(report, lazy=False, text=bottom) == {"earlyexit_kernels._version"}
    assert layer_of("earlyexit_kernels._version") < min(LAYERS.values())


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_lazy_imports_included():
    graph = {m: imports_of(p, lazy=True) for m, p in MODULES.items() if m != ROOT}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) is not None))
def test_modules_import_only_their_own_layer_or_lower(module):
    upward = sorted(
        target
        for target in imports_of(MODULES[module], lazy=True)
        if layer_of(target) is None or layer_of(target) > layer_of(module)
    )
    assert not upward, f"{module} imports {upward}, above its layer"


def test_package_folder_holds_only_the_facade_and_subpackages():
    top = {p.stem for p in PACKAGE_DIR.glob("*.py")}
    assert top == TOP_LEVEL_MODULES
    subpackages = {p.parent.name for p in PACKAGE_DIR.glob("*/__init__.py")}
    assert subpackages == set(LAYERS)


def test_every_module_imports():
    """An optional dependency (starlette, matplotlib, ...) may be missing; the package's own may not."""
    for module in MODULES:
        if module.endswith("__main__"):
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name is None or err.name.split(".")[0] == ROOT:
                raise


def test_public_names_stay_where_users_import_them():
    from earlyexit_kernels.ray import EarlyExitClassifier
    from earlyexit_kernels.training import pabee_loss, train_exit_heads

    assert EarlyExitClassifier.__module__ == "earlyexit_kernels.integrations.ray_data"
    assert train_exit_heads.__module__ == "earlyexit_kernels.training.train"
    assert pabee_loss.__module__ == "earlyexit_kernels.methods.losses"
    for name in eek.__all__:
        assert getattr(eek, name) is not None


def test_only_the_patching_package_reads_or_writes_the_patched_models_attributes():
    """What ``eek.patch`` leaves on a model is one record with its accessors in ``patching/``."""
    outside = sorted(
        module
        for module, path in MODULES.items()
        if layer_of(module) != LAYERS["patching"] and "_eek_" in path.read_text()
    )
    assert not outside, f"these modules touch a patched model's _eek_ attributes: {outside}"


#: past this many lines a module usually holds two ideas; one that does not says why at its top
LONG_MODULE_LINES = 600


def test_a_module_past_600_lines_says_why_at_its_top():
    roots = [PACKAGE_DIR, PACKAGE_DIR.parent / "python_tests", PACKAGE_DIR.parent / "benchmarks"]
    unexplained = []
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            text = path.read_text()
            if text.count("\n") > LONG_MODULE_LINES and "(Past 600 lines:" not in text[:2000]:
                unexplained.append(str(path.relative_to(PACKAGE_DIR.parent)))
    assert not unexplained, f"over {LONG_MODULE_LINES} lines without the reason at the top: {unexplained}"


def test_no_module_inside_the_package_imports_the_facade():
    """``eek`` is for users: a subpackage imports the modules that define what it needs (the
    facade sits above every layer); the version is read from ``earlyexit_kernels._version``."""
    through_facade = []
    for module, path in MODULES.items():
        if layer_of(module) is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(alias.name == ROOT for alias in node.names):
                through_facade.append(module)
            elif isinstance(node, ast.ImportFrom) and node.module == ROOT and node.level == 0:
                through_facade.append(module)
    assert not through_facade, f"these modules import earlyexit_kernels' facade: {sorted(set(through_facade))}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == LAYERS["calibration"]))
def test_calibration_reads_recorded_logits_only(module):
    """``calibration/`` is tensor code over recorded logits: it never imports the layers that run, patch or
    train a model or read its folder, lazily included (the layer rule alone would let it import nothing
    above ``methods/`` anyway; this names the reason)."""
    reached = sorted(
        target
        for target in imports_of(MODULES[module], lazy=True)
        if target.split(".")[1:2] and target.split(".")[1] in CALIBRATION_NEVER_IMPORTS
    )
    assert not reached, f"{module} imports {reached}: calibration/ reads recorded logits only"


# engine/ in wings: each wing and its level; a module of engine/ imports (lazily included) from its own wing or a
# lower level, and two wings on one level (stream/ and graphed/) never import each other
ENGINE = f"{ROOT}.engine"
ENGINE_WINGS = {"layers": 0, "step": 1, "stream": 2, "graphed": 2, "engines": 3, "entry": 4}
#: the CPU's engine and the GPU's inside engines/: neither group imports the other (engines.choice builds either)
CPU_ENGINE = (f"{ENGINE}.engines.continuous",)
GPU_ENGINES = tuple(f"{ENGINE}.engines.{name}" for name in ("cohort_engine", "launched", "segments", "varlen"))


def engine_wing(module: str) -> str | None:
    """The wing of a module of ``engine/`` (``earlyexit_kernels.engine.step.batch_loop`` -> ``"step"``), else None."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == [ROOT, "engine"] else None


def wing_arrows_back(module: str, targets: set[str]) -> list[str]:
    """The imports of ``targets`` that run back up from ``module``'s wing, or sideways to the other wing of its level."""
    own = engine_wing(module)
    return sorted(
        target
        for target in targets
        if (wing := engine_wing(target)) is not None and wing != own and (ENGINE_WINGS[wing] >= ENGINE_WINGS[own])
    )


def in_group(module: str, group: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in group)


ENGINE_MODULES = sorted(m for m in MODULES if engine_wing(m) is not None)


def test_engine_holds_at_most_six_wings_and_nothing_beside_them():
    engine_dir = PACKAGE_DIR / "engine"
    assert {p.stem for p in engine_dir.glob("*.py")} == {"__init__"}
    wings = {p.parent.name for p in engine_dir.glob("*/__init__.py")}
    assert wings == set(ENGINE_WINGS)
    assert len(wings) <= 6


def test_the_wing_rule_finds_an_arrow_up_and_one_sideways():
    """The rule itself, on imports written for it: graphed/ importing stream/ (sideways), step/ importing engines/
    (up); entry/ importing layers/ (down) passes."""
    graphed = f"{ENGINE}.graphed.static_step"
    assert wing_arrows_back(graphed, {f"{ENGINE}.stream.admission"}) == [f"{ENGINE}.stream.admission"]
    assert wing_arrows_back(f"{ENGINE}.step.heads", {f"{ENGINE}.engines.choice"}) == [f"{ENGINE}.engines.choice"]
    assert wing_arrows_back(f"{ENGINE}.entry.classify", {f"{ENGINE}.layers.precision", graphed}) == []
    lazy_up = "def f():\n    from earlyexit_kernels.engine.entry.classify import classify\n"
    found = imports_of(MODULES[f"{ENGINE}.step.heads"], lazy=True, text=lazy_up)
    assert wing_arrows_back(f"{ENGINE}.step.heads", found) == [f"{ENGINE}.entry", f"{ENGINE}.entry.classify"]


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_engine_wings_import_one_way(module):
    """entry -> engines -> stream and graphed -> step -> layers, lazy imports included."""
    back = wing_arrows_back(module, imports_of(MODULES[module], lazy=True))
    assert not back, f"{module} imports {back}: against the wings' direction ({ENGINE_WINGS})"


@pytest.mark.parametrize("module", [m for m in ENGINE_MODULES if in_group(m, CPU_ENGINE + GPU_ENGINES)])
def test_the_cpu_engine_and_the_gpu_engines_do_not_import_each_other(module):
    other = GPU_ENGINES if in_group(module, CPU_ENGINE) else CPU_ENGINE
    reached = sorted(t for t in imports_of(MODULES[module], lazy=True) if in_group(t, other))
    assert not reached, f"{module} imports {reached}"
