"""Infinity (``infinity_emb``), the peer of ``eek serve`` in the serving benchmark, run from its own environment.

Infinity is never a requirement of this package: it lives in a virtual environment of its own
(``benchmarks/setup_infinity_env.sh`` makes ``.venv-infinity``: ``torch==2.13.0`` first, then
``infinity-emb[server,torch,optimum]``), found through that environment's Python
(:func:`find_infinity`); where it is absent the benchmark skips the peers and says why.

Four configurations of the same plain classifier (the weights ``eek serve`` runs):

- ``infinity torch fp32``: ``--engine torch --dtype float32``;
- ``infinity torch int8``: ``--engine torch --dtype int8`` (Infinity's own int8 on the CPU:
  ``torch.quantization.quantize_dynamic`` of every ``nn.Linear``);
- ``infinity onnx fp32``: ``--engine optimum`` on ``optimum-cli export onnx --task
  text-classification``;
- ``infinity onnx int8``: ``--engine optimum`` on ``optimum-cli onnxruntime quantize`` of that
  export (dynamic int8 for this CPU's instructions: ``--avx512_vnni``, ``--avx512``, ``--avx2`` or
  ``--arm64``), in a folder of its own (on a CPU Infinity takes a quantized file over
  ``model.onnx`` when a folder holds both).

How each is started, as issue 53's author ran them: the process pinned (``cores``),
``OMP_NUM_THREADS`` set; Infinity's ONNX Runtime sessions ignore ``OMP_NUM_THREADS``, so
:data:`LAUNCH` sets the intra- and inter-op threads of every ``onnxruntime.InferenceSession``
before Infinity's own command line starts; the optimum engine finds a local ONNX folder only
when started inside it (``--model-id .``); ``--no-model-warmup`` (its warm-up sends 514
untruncated tokens, which crashes ONNX Runtime); batches of at most ``--batch-size``. Each
process gets a Hugging Face home of its own (Infinity caches its optimized ONNX files there by
model id, and every ONNX configuration's id is ``.``), offline, with Infinity's usage telemetry off.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from earlyexit_kernels.bench.server_process import LocalServer, free_port

__all__ = ["PEERS", "Peer", "find_infinity", "export_onnx", "InfinityServer", "quantize_flag"]

#: the environment benchmarks/setup_infinity_env.sh makes, relative to the repository root
DEFAULT_ENV = Path(".venv-infinity")
SETUP = "benchmarks/setup_infinity_env.sh"
MODEL_NAME = "peer"  # --served-model-name; the "model" of each request


@dataclass(frozen=True)
class Peer:
    name: str
    engine: str  # torch or optimum
    dtype: str  # float32 or int8
    onnx: str | None = None  # optimum: "fp32" or "int8", the export it serves


PEERS = (
    Peer("infinity torch fp32", "torch", "float32"),
    Peer("infinity torch int8", "torch", "int8"),
    Peer("infinity onnx fp32", "optimum", "float32", "fp32"),
    Peer("infinity onnx int8", "optimum", "float32", "int8"),
)

#: run by Infinity's Python as ``python -I -c LAUNCH v2 ...``: ONNX Runtime's session threads set
#: (EEK_ORT_THREADS, default 1), then Infinity's command line
LAUNCH = r"""
import os, sys
threads = int(os.environ.get("EEK_ORT_THREADS", "1"))
try:
    import onnxruntime
except ImportError:
    onnxruntime = None
if onnxruntime is not None:
    _init = onnxruntime.InferenceSession.__init__

    def _init_with_threads(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
        _init(self, path_or_bytes, options, *args, **kwargs)

    onnxruntime.InferenceSession.__init__ = _init_with_threads
from infinity_emb.cli import cli

sys.argv[0] = "infinity_emb"
sys.exit(cli())
"""

_PROBE = r"""
import importlib.metadata as md, json
import infinity_emb
versions = {}
for name in ("infinity-emb", "torch", "transformers", "optimum", "optimum-onnx", "onnxruntime"):
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
print(json.dumps(versions))
"""


def default_python() -> Path:
    """``.venv-infinity/bin/python`` of the current folder (the repository root, where the benchmark runs)."""
    return DEFAULT_ENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def find_infinity(python: str | os.PathLike | None) -> tuple[dict | None, str]:
    """``(versions, "")`` where ``python`` runs Infinity, else ``(None, why not)``.

    ``versions``: the package versions of that environment (``infinity-emb``, ``torch``,
    ``transformers``, ``optimum``, ``onnxruntime``, ...).
    """
    python = Path(python) if python is not None else default_python()
    if not python.exists():
        return None, f"Infinity is not installed: {python} does not exist (run {SETUP} to make it)"
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"{python} does not run: {err}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return None, f"Infinity is not installed in {python}'s environment: {last}"
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def quantize_flag() -> str:
    """``optimum-cli onnxruntime quantize``'s target for this CPU: the widest instructions it has."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "--arm64"
    try:
        flags = set(
            next(
                (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
            ).split()
        )
    except OSError:
        flags = set()
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "--avx512_vnni"
    if "avx512f" in flags:
        return "--avx512"
    return "--avx2"


def _optimum_cli(python: Path, *args: str, timeout: float = 900) -> None:
    command = [str(python), "-I", "-m", "optimum.commands.optimum_cli", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stderr or done.stdout)[-3000:]}")


def export_onnx(python: str | os.PathLike, plain_dir: Path, target: Path) -> dict[str, Path]:
    """The plain classifier in ONNX: ``{"fp32": target/onnx-fp32, "int8": target/onnx-int8}``.

    ``optimum-cli export onnx --task text-classification``, then ``optimum-cli onnxruntime
    quantize`` (:func:`quantize_flag`) into a folder of its own; a folder already holding its
    ``.onnx`` file is kept.
    """
    python = Path(python)
    fp32, int8 = target / "onnx-fp32", target / "onnx-int8"
    if not (fp32 / "model.onnx").is_file():
        _optimum_cli(python, "export", "onnx", "--task", "text-classification", "--model", str(plain_dir), str(fp32))
    if not list(int8.glob("*quantized*.onnx")):
        _optimum_cli(python, "onnxruntime", "quantize", "--onnx_model", str(fp32), quantize_flag(), "-o", str(int8))
    return {"fp32": fp32, "int8": int8}


class InfinityServer(LocalServer):
    """``infinity_emb v2`` serving ``peer`` on a free port of 127.0.0.1 (see the module's docstring).

    ``model_dir``: the plain classifier (torch engine) or the ONNX folder (optimum engine);
    ``home``: a folder of this process's own for its Hugging Face cache.
    """

    def __init__(
        self,
        python: str | os.PathLike,
        peer: Peer,
        model_dir: Path,
        home: Path,
        *,
        threads: int = 1,
        max_batch_size: int = 32,
        cores: tuple[int, ...] | None = None,
    ):
        port = free_port()
        inside = peer.engine == "optimum"
        command = [str(python), "-I", "-c", LAUNCH, "v2", "--model-id", "." if inside else str(model_dir)]
        command += ["--served-model-name", MODEL_NAME, "--engine", peer.engine, "--device", "cpu"]
        command += ["--dtype", peer.dtype, "--batch-size", str(max_batch_size), "--no-model-warmup"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "EEK_ORT_THREADS": str(threads),
            "HF_HOME": str(home),
            "INFINITY_HOME": str(home / "infinity"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "INFINITY_ANONYMOUS_USAGE_STATS": "0",
            "DO_NOT_TRACK": "1",
        }
        super().__init__(
            command,
            port,
            env=env,
            cores=cores,
            cwd=model_dir if inside else None,
            startup_seconds=300,
            name=peer.name,
        )


def describe_command(peer: Peer, max_batch_size: int = 32) -> str:
    """The Infinity command line of ``peer``, as the benchmark's notes print it."""
    model = "." if peer.engine == "optimum" else "PLAIN"
    return (
        f"infinity_emb v2 --model-id {model} --engine {peer.engine} --device cpu --dtype {peer.dtype} "
        f"--batch-size {max_batch_size} --no-model-warmup"
    )


if __name__ == "__main__":  # python -m benchmarks.suite.infinity_peer [PYTHON]: is Infinity there?
    found, why = find_infinity(sys.argv[1] if len(sys.argv) > 1 else None)
    print(json.dumps(found) if found else why)
    sys.exit(0 if found else 1)
