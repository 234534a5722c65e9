"""The torch floor in pyproject.toml is the oldest torch that has what the backends use.

Older releases would install and import, but without ``torch.library.triton_op`` and
``torch.library.wrap_triton`` (torch 2.6) the Triton backend does not register and
``backend="auto"`` silently falls back; ``torch.nonzero_static`` runs on CUDA from 2.6 on.
"""

import re
from pathlib import Path

import torch

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
NEEDED = (2, 6)


def _floor(requirement_name: str) -> tuple[int, ...]:
    # the dependencies list of [project] (tomllib is not in Python 3.10, which the package supports)
    match = re.search(rf'^\s*"{requirement_name}\s*>=\s*([0-9.]+)[^"]*",', PYPROJECT.read_text(), re.MULTILINE)
    if match:
        return tuple(int(part) for part in match.group(1).split("."))
    raise AssertionError(f"pyproject.toml has no {requirement_name}>= requirement")


def test_torch_floor_is_the_release_with_the_library_apis_the_backends_use():
    assert _floor("torch")[:2] >= NEEDED, "torch.library.triton_op / wrap_triton need torch 2.6"


def test_installed_torch_has_them():
    for name in ("triton_op", "wrap_triton", "custom_op", "register_fake", "opcheck"):
        assert hasattr(torch.library, name), name
    assert hasattr(torch, "nonzero_static")
