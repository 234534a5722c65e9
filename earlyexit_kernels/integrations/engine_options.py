"""The engine's settings on the command line, made from :class:`EngineConfig`'s fields.

``eek classify`` and ``eek serve`` add the same options with :func:`add_engine_options`: each flag's
help line, metavar, choices and what None means come from the field's metadata
(:mod:`earlyexit_kernels.engine.engine_config`), its default from the entry point's own settings
(``eek serve``'s :class:`~earlyexit_kernels.integrations.server.serve_settings.ServeSettings`,
``eek classify``'s ``eek.classify``). The values come back as ``EngineConfig`` keywords
(:func:`engine_keywords`) and are checked by ``EngineConfig`` alone (:func:`checked_engine`): a bad
value gets the object's own message, with the flag named, on every entry point.
"""

from __future__ import annotations

import dataclasses

from earlyexit_kernels.engine.engine_config import EngineConfig
from earlyexit_kernels.integrations.cli_options import CliError, max_age

__all__ = ["add_engine_options", "engine_keywords", "checked_engine", "flag_of"]

_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig) if f.metadata.get("help")}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse(name: str):
    """The argparse type of a numeric field: a number of tokens for ``call_cost``, else a whole number
    (``--max-age``'s words are parsed by :func:`engine_keywords`)."""
    return float if name == "call_cost" else int


def _shown(name: str, value) -> str:
    return _FIELDS[name].metadata["none"] if value is None else str(value)


def add_engine_options(parser, defaults: dict, names: tuple[str, ...]) -> None:
    """Add the flags of ``names`` (EngineConfig fields) to ``parser``, each with ``defaults[name]`` (the entry
    point's default, as the parser's; ``max_age`` as its text, e.g. ``"0"``)."""
    for name in names:
        meta = _FIELDS[name].metadata
        default = defaults[name]
        if name == "compile":
            parser.add_argument(flag_of(name), action="store_true", help=meta["help"])
            continue
        shown = default if name == "max_age" else _shown(name, default)
        kwargs = {"default": default, "help": f"{meta['help']} (default: {shown})"}
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["metavar"] = meta["metavar"]
            if name != "max_age":  # its default is text, parsed by engine_keywords
                kwargs["type"] = _parse(name)
        parser.add_argument(flag_of(name), **kwargs)


def engine_keywords(args, names: tuple[str, ...]) -> dict:
    """The parsed flags of ``names`` as EngineConfig keywords (``--max-age``'s text turned into its value)."""
    out = {name: getattr(args, name) for name in names}
    if "max_age" in out and isinstance(out["max_age"], str):
        out["max_age"] = max_age(out["max_age"])
    return out


def checked_engine(keywords: dict, **fixed) -> EngineConfig:
    """``EngineConfig(**keywords, **fixed)``; a bad value is a :class:`CliError` naming its flag in the
    object's own words (``--max-batch-size: max_batch_size must be an integer >= 1 or None, got 0``)."""
    try:
        return EngineConfig(**keywords, **fixed)
    except ValueError as error:
        name = next((n for n in keywords if str(error).startswith(n + " ")), None)
        raise CliError(f"{flag_of(name)}: {error}" if name else str(error)) from None
