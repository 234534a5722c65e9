"""The optional dependencies of each feature (pyproject.toml's extras) and the line that installs them.

The package is installed from its repository (``pip install --no-build-isolation '.[serve]'``
there), not from a package index, so a message cannot say ``pip install
'earlyexit_kernels[serve]'``: it names the packages themselves, which install into any
environment that has the package. ``python_tests/test_docs_install_lines.py`` checks this table
against pyproject.toml.
"""

from __future__ import annotations

import shlex

__all__ = ["EXTRAS", "install_line"]

#: extra -> its requirements, as pyproject.toml's [project.optional-dependencies] lists them
EXTRAS: dict[str, tuple[str, ...]] = {
    "cli": ("pyarrow", "pandas"),
    "openvino": ("openvino>=2025.1", "nncf>=2.14", "onnx>=1.15"),
    "ray": ("ray[data]>=2.40", "pandas", "pyarrow"),
    "serve": (
        "starlette>=0.37",
        "uvicorn>=0.29",
        "prometheus_client>=0.20",
        "swagger-ui-py>=25",
        "pydantic>=2",
        "onnxruntime>=1.17",
        "onnx>=1.15",
    ),
}


def install_line(extra: str) -> str:
    """The ``pip install`` command of ``extra``'s requirements, quoted for a shell."""
    return "pip install " + " ".join(shlex.quote(requirement) for requirement in EXTRAS[extra])
