"""Each setting's bound is written once in the package (issue 97): ``max_drop``, ``lr``, ``epochs``, ``confidence``,
``batch_size``, ``max_length``, ``guarantee`` and the audit's ``fraction`` are compared with their bounds only inside
the settings objects
and the checks those call; a comparison of one of them with a number (``lr > 0``, ``0.0 < confidence < 1.0``)
or of ``guarantee`` with its choices anywhere else is a second bound, which can drift from the first.

A new one fails here: route it through the settings object (:class:`FitConfig`, :class:`Training`,
:class:`TrainSettings`, the calibration's ``Goal``, :class:`EngineConfig`, the audit's :class:`AuditConfig`, or the
check each calls), keeping the words users see. The audit's ``budget`` is not scanned by name: ``budget`` is also the
argument of the bounds' arithmetic in ``methods/`` (``budget <= 0.0`` there is a case of the formula, not a check);
its bound is :func:`check_audit_budget`'s, which :class:`AuditConfig` calls, as ``eek serve``'s flags do."""

import ast
from pathlib import Path

import earlyexit_kernels as eek

PACKAGE_DIR = Path(eek.__file__).resolve().parent
SETTINGS = {
    "max_drop",
    "lr",
    "epochs",
    "confidence",
    "batch_size",
    "max_length",
    "guarantee",
    "fraction",
    "audit_fraction",
}

#: where the bounds may be written: (module, its top-level function or class; None: the whole module); most are
#: written through helpers over a generic ``value`` (check_count, check_rate, _points, _whole), which this scan
#: does not see by name; test_settings_errors holds the refusals themselves
BOUNDS = {
    ("training/fit_config.py", None),  # FitConfig, Training, TrainSettings, check_count, check_rate
    ("calibration/select.py", "Goal"),
    ("engine/stream/engine_config.py", None),
    ("methods/risk_control.py", "check_confidence"),  # what Goal and certify call
    ("calibration/certificate.py", "check_guarantee"),  # what Goal and certify call
    ("methods/risk_control.py", "check_fraction"),  # the audit's fraction: what AuditConfig and the online tests call
}
#: the ones left, each for a reason; this list only shrinks (a stale entry fails too)
KNOWN = {
    # a use, not a bound: a one-shot iterator trains one epoch through the forward
    ("training/train.py", "train_exit_heads", "epochs > 1"),
    # uses, not bounds: whether an audit runs, on a fraction checked already
    ("integrations/classify.py", "classify", "fraction > 0"),
    ("integrations/online_certificate.py", "resolve_online_certificate", "fraction > 0"),
    # the calibration and validation splits' fraction, checked by FitConfig and again where the rows are split
    ("training/labelled_texts.py", "split_rows", "0.0 < fraction < 1.0"),
}


def _name(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _number(node) -> bool:
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool)


def _is_bound(compare: ast.Compare) -> bool:
    """A setting compared with a number (an order), or ``guarantee`` tested against its choices."""
    items = [compare.left, *compare.comparators]
    for op, left, right in zip(compare.ops, items, items[1:]):
        if isinstance(op, ast.Lt | ast.LtE | ast.Gt | ast.GtE):
            if (_name(left) in SETTINGS and _number(right)) or (_name(right) in SETTINGS and _number(left)):
                return True
        if isinstance(op, ast.In | ast.NotIn) and _name(left) == "guarantee":
            return True
    return False


def bounds_in(text: str, module: str) -> set[tuple[str, str | None, str]]:
    """``(module, top-level function or class, the comparison)`` of every bound written in ``text``."""
    found = set()
    for top in ast.parse(text).body:
        owner = top.name if isinstance(top, ast.FunctionDef | ast.ClassDef) else None
        for node in ast.walk(top):
            if isinstance(node, ast.Compare) and _is_bound(node):
                found.add((module, owner, ast.unparse(node)))
    return found


def _every_bound() -> set[tuple[str, str | None, str]]:
    found = set()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        found |= bounds_in(path.read_text(), path.relative_to(PACKAGE_DIR).as_posix())
    return found


def test_each_settings_bound_is_written_in_its_settings_object_only():
    found = _every_bound()
    stray = {b for b in found if (b[0], None) not in BOUNDS and (b[0], b[1]) not in BOUNDS and b not in KNOWN}
    assert not stray, f"bounds written outside the settings objects (route them through one): {sorted(stray)}"
    assert KNOWN <= found, f"stale entries of KNOWN (drop them): {sorted(KNOWN - found)}"


def test_a_bound_written_elsewhere_is_found():
    text = "def serve(lr, options):\n    if options.confidence >= 1.0 or not lr > 0:\n        raise ValueError\n"
    assert bounds_in(text, "x.py") == {("x.py", "serve", "options.confidence >= 1.0"), ("x.py", "serve", "lr > 0")}
    assert bounds_in("if guarantee not in ('probable',):\n    pass\n", "y.py") == {
        ("y.py", None, "guarantee not in ('probable',)")
    }
    assert not bounds_in("ok = 1 <= len(ids) <= max_length and epochs is None\n", "z.py")  # uses, not bounds
