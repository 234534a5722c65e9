"""``--device`` and ``--dtype``: the base every command that loads a model runs it on.

Written out here, not imported from :mod:`earlyexit_kernels.engine.precision`, so that ``--help``
imports no torch; a test holds the two equal.
"""

from __future__ import annotations

__all__ = ["DEVICES", "DTYPES", "add_base_options"]

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "int8")


def add_base_options(parser, *, dtypes: tuple[str, ...] = DTYPES) -> None:
    """Add ``--device`` (default auto) and ``--dtype`` (default: as saved) to ``parser``."""
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where the model runs: auto (default: the GPU where torch sees one, else the CPU), cpu or cuda",
    )
    int8 = (
        "; int8: the encoder's Linear layers dynamically quantized with the recipe the family needs (CPU only)"
        if "int8" in dtypes
        else ""
    )
    parser.add_argument(
        "--dtype",
        choices=dtypes,
        default=None,
        help=f"the base the layers run in: {', '.join(dtypes)} (default: as saved){int8}; the exit heads run fused "
        f"on it",
    )
