"""Exit policies from text, as the command line takes them: ``"Entropy(0.3)"``, ``"Patience(patience=2)"``.

The text is parsed with :mod:`ast`, never evaluated: a policy name, then literal
arguments (numbers, strings, True/False/None, lists and tuples of them).
"""

from __future__ import annotations

import ast
import inspect

from earlyexit_kernels.methods import policies
from earlyexit_kernels.methods.policies import ExitPolicy, Scheduled

__all__ = ["POLICY_NAMES", "parse_policy"]

# Every policy of methods/policies.py but Scheduled (exit layers given per batch position: not text).
_POLICIES = {
    name: cls
    for name, cls in ((name, getattr(policies, name)) for name in policies.__all__)
    if isinstance(cls, type) and issubclass(cls, ExitPolicy) and cls not in (ExitPolicy, Scheduled)
}
POLICY_NAMES = tuple(_POLICIES)
_EXAMPLES = (
    f"one of {', '.join(POLICY_NAMES)} with literal arguments, "
    'e.g. "Entropy(0.3)", "Patience(2)", "MaxProb(0.9)", "QExit(q=0.5)", "Voting(3)", "DACT()"'
)


def parse_policy(text: str) -> ExitPolicy:
    """The policy ``text`` describes; ``ValueError`` saying what to fix otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a policy is a name and its arguments, {_EXAMPLES}; got {text!r}")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ValueError(
            f"cannot parse the policy {text!r} ({error.msg}); write it as in Python, {_EXAMPLES}"
        ) from None
    if isinstance(node, ast.Name):  # "DACT" without parentheses
        node = ast.Call(func=node, args=[], keywords=[])
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise ValueError(f"the policy {text!r} must be a policy name and its arguments, {_EXAMPLES}")
    name = node.func.id
    if name == "Scheduled":
        raise ValueError(
            "Scheduled replays exit layers per batch position and cannot be given as text; "
            f"use one of {', '.join(POLICY_NAMES)}"
        )
    if name not in _POLICIES:
        raise ValueError(f"unknown policy {name!r}; the policies are {', '.join(POLICY_NAMES)}")
    try:
        args = [ast.literal_eval(arg) for arg in node.args]
        kwargs = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise ValueError("**arguments")
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
    except ValueError:
        raise ValueError(
            f"the arguments of {text!r} must be literals (numbers, strings, True/False, lists); {_EXAMPLES}"
        ) from None
    signature = inspect.signature(_POLICIES[name])
    unknown = [keyword for keyword in kwargs if keyword not in signature.parameters]
    try:
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise ValueError(f"{text.strip()}: {error}; write {_signature(name)}") from None
    return _POLICIES[name](*args, **kwargs)


def _signature(name: str) -> str:
    """``Entropy(threshold, normalized=False)``: how the policy ``name`` takes its arguments."""
    arguments = []
    for parameter in inspect.signature(_POLICIES[name]).parameters.values():
        default = parameter.default
        arguments.append(parameter.name if default is inspect.Parameter.empty else f"{parameter.name}={default!r}")
    return f"{name}({', '.join(arguments)})"
