"""A local HTTP server process for the serving benchmarks: started, waited for, measured, stopped.

:class:`LocalServer` runs a command (``eek serve`` or a peer such as Infinity) on 127.0.0.1,
optionally pinned to some cores (``os.sched_setaffinity`` in the child before it starts, as
``taskset -c`` does), waits until ``GET /health`` answers 200, reads the process's resident
memory (``VmRSS`` of ``/proc/PID/status``) and stops it with SIGTERM. :class:`EekServer` is
``python -m earlyexit_kernels serve`` as one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LocalServer", "EekServer", "free_port", "resident_kib", "parse_cores", "pin"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resident_kib(pid: int, field: str = "VmRSS") -> int | None:
    """The resident memory of process ``pid`` in KiB, None where /proc does not say.

    ``field``: ``VmRSS`` (now) or ``VmHWM`` (its peak so far).
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def parse_cores(text: str | None) -> tuple[int, ...] | None:
    """``"0"`` or ``"0,2-3"`` -> (0,) or (0, 2, 3); ``"none"``, empty or None -> None (no pinning)."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    cores: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        cores += range(int(low), int(high or low) + 1)
    return tuple(cores)


def pin(cores: Sequence[int] | None) -> None:
    """Pin this process to ``cores`` (nothing where None or where the platform cannot)."""
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))


class LocalServer:
    """``command`` (which must listen on ``port``) as a child process; ``url`` once it answers ``/health``.

    ``env`` is added to this process's environment; ``cores`` pins the child; ``cwd`` is its
    working directory. Its stderr goes to a temporary file whose tail is in the error raised
    when the server does not start within ``startup_seconds``.
    """

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        cores: Sequence[int] | None = None,
        cwd: str | os.PathLike | None = None,
        startup_seconds: float = 180.0,
        name: str = "server",
    ):
        import httpx

        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile()
        preexec = (lambda: pin(cores)) if cores else None
        self.process = subprocess.Popen(
            list(command),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            preexec_fn=preexec,
        )
        deadline = time.monotonic() + startup_seconds
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start ({' '.join(map(str, command))}):\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.process.pid

    def resident_kib(self) -> int | None:
        return resident_kib(self.process.pid)

    def log_tail(self, chars: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class EekServer(LocalServer):
    """``python -m earlyexit_kernels serve`` on a free port, stopped with SIGTERM.

    ``policy`` None serves the folder's saved policy; ``extra`` are more ``eek serve`` options
    (``--dtype int8``); ``cores`` pins the server (the client keeps the others); ``env`` is added
    to its environment (``OMP_NUM_THREADS``); ``launcher`` is what runs ``eek`` (a profiler's
    wrapper, such as ``benchmarks/profiles/heap_snapshots.py``).
    """

    def __init__(
        self,
        model_dir: Path,
        policy: str | None,
        max_batch_size: int,
        threads: int,
        *,
        extra: tuple[str, ...] = (),
        cores: tuple[int, ...] | None = None,
        env: dict[str, str] | None = None,
        name: str = "eek serve",
        launcher: Sequence[str] = (sys.executable, "-m", "earlyexit_kernels"),
    ):
        port = free_port()
        command = [*launcher, "serve", str(model_dir), "--port", str(port)]
        command += ["--policy", policy] if policy is not None else []
        command += ["--max-batch-size", str(max_batch_size), "--max-queue", "4096"]
        # One thread: the client takes the other core; a 2-thread layer call would wait at each
        # barrier for a core the client holds (latencies of 100+ ms on 2 cores).
        command += ["--log-level", "warning", "--threads", str(threads), *extra]
        super().__init__(command, port, env=env, cores=cores, startup_seconds=120, name=name)
