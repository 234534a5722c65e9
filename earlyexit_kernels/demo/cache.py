"""Where the real task's material is cached: fine-tuned models, fitted exit heads, assembled checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """Where the fine-tuned model is cached: ``$EEK_CACHE_DIR``, else ``.cache/`` of this checkout.

    A checkout keeps its own cache (two checkouts never share one); an installed, non-editable
    package caches under ``~/.cache/earlyexit_kernels``.
    """
    if os.environ.get("EEK_CACHE_DIR"):
        return Path(os.environ["EEK_CACHE_DIR"])
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "setup.py").is_file() and (checkout / "earlyexit_kernels").is_dir():
        return checkout / ".cache"
    return Path.home() / ".cache" / "earlyexit_kernels"
