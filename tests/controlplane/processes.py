"""Processes of the test cluster: each in its own process group with its log in the cluster's folder, waited
on until a probe answers, and stopped group by group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

LOOPBACK = "127.0.0.1"


class ControlPlaneError(RuntimeError):
    """A component did not build, start or become ready; the message names it and its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def spawn(name: str, argv: list[str], folder: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = (folder / f"{name}.log").open("ab")
    return subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=folder,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its own process group: `stop` ends it and every child
    )


def wait_ready(name: str, process: subprocess.Popen, folder: Path, probe, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = (folder / f"{name}.log").read_text(errors="replace")[-3000:]
            raise ControlPlaneError(f"{name} exited with {process.returncode}; {folder / name}.log ends:\n{tail}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise ControlPlaneError(f"{name} not ready after {timeout:.0f} s; see {folder / name}.log")


def https_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=context) as response:
        return response.status == 200


def terminate(pids: dict[str, int], grace: float = 15) -> None:
    """SIGTERM each process group (reverse start order), SIGKILL what is left after `grace`, and wait until
    every process is gone (or a zombie its parent has yet to reap)."""
    for pid in reversed(list(pids.values())):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(pid) for pid in pids.values()):
        time.sleep(0.1)
    for pid in pids.values():
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in pids.values()):
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie); reaps it when it is our own child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
