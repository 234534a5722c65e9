"""``--device`` and ``--dtype``: the base every command that loads a model runs it on.

Written out here, not imported from :mod:`earlyexit_kernels.engine.precision`, so that ``--help``
imports no torch; a test holds the two equal.
"""

from __future__ import annotations

__all__ = ["DEVICES", "DTYPES", "INT8_LAYERS", "add_base_options", "add_int8_layers_option"]

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "int8")
#: where the int8 layers run (``engine.precision.INT8_LAYERS``'s keys, and auto)
INT8_LAYERS = ("auto", "onnxruntime", "openvino", "torch")


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


def add_int8_layers_option(parser) -> None:
    """Add ``--layers`` (default auto): where the int8 layers run, the recipe the certificate is made on."""
    parser.add_argument(
        "--layers",
        choices=INT8_LAYERS,
        default="auto",
        help="with --dtype int8, where the int8 layers run, one activation scale per token and one weight scale per "
        "output channel: auto (default: ONNX Runtime where it is installed, else PyTorch), onnxruntime, openvino "
        "(openvino installed; faster on the CPUs measured with AMX: docs/serving.md) or torch. The certificate is "
        "made on those layers and recorded with them; eek serve runs them",
    )
