"""Starting local servers on loopback without free-port races.

Picking a port by binding port 0, closing that socket and starting a server on the number later
is a race: another process can take the port in between. Two ways round it, by what the server
can do:

- It can bind port 0 itself and print the address it got (`saber emulator` and `saber sidecar`
  print "... listening on http://HOST:PORT"): start it with `--port 0` and read its URL from its
  log with `wait_for_listen_url` (or `await_listen_url`). No port number is ever guessed.
- It needs a port number (vLLM, Prometheus): `retry_on_port_clash` picks a port that is free
  now and calls `start(port)`; when the server exits early because the port was taken meanwhile
  (`start` raises `PortInUse`, see `address_in_use`), it tries again on a new port, a bounded
  number of times.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# The startup line of `saber emulator` and `saber sidecar`.
LISTEN_URL = re.compile(r"listening on (http://\S+)")
# How a server says it could not bind: Go's net package (Prometheus), Python's OSError (vLLM).
ADDRESS_IN_USE = re.compile(r"address already in use|EADDRINUSE|\[Errno 98\]", re.IGNORECASE)
PORT_ATTEMPTS = 5

T = TypeVar("T")


class ServerStartError(RuntimeError):
    """A server process exited, or did not print its address, before it was up."""


class PortInUse(RuntimeError):
    """The server could not bind its port: another process took it first."""


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def address_in_use(log_text: str) -> bool:
    """Whether a server's output says it failed to bind because the address was in use."""
    return ADDRESS_IN_USE.search(log_text) is not None


def _listen_url(popen: subprocess.Popen, log_path: Path, pattern: re.Pattern[str], name: str) -> str | None:
    try:
        found = pattern.search(Path(log_path).read_text(errors="replace"))
    except OSError:
        found = None
    if found:
        return found.group(1)
    if popen.poll() is not None:
        raise ServerStartError(f"{name} exited with code {popen.returncode} before listening; "
                               f"log {log_path}:\n{log_tail(log_path)}")
    return None


def _not_listening(name: str, timeout_s: float, log_path: Path) -> ServerStartError:
    return ServerStartError(f"{name} did not print its address within {timeout_s:.0f} s; "
                            f"log {log_path}:\n{log_tail(log_path)}")


def wait_for_listen_url(popen: subprocess.Popen, log_path: Path, *, name: str = "server",
                        timeout_s: float = 60.0, pattern: re.Pattern[str] = LISTEN_URL) -> str:
    """The URL a process started with `--port 0` prints once it listens (its output goes to log_path).

    Raises ServerStartError if it exits first or prints nothing within timeout_s; stopping the
    process is the caller's job.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        url = _listen_url(popen, log_path, pattern, name)
        if url:
            return url
        if time.monotonic() > deadline:
            raise _not_listening(name, timeout_s, log_path)
        time.sleep(0.05)


async def await_listen_url(popen: subprocess.Popen, log_path: Path, *, name: str = "server",
                           timeout_s: float = 60.0, pattern: re.Pattern[str] = LISTEN_URL) -> str:
    """`wait_for_listen_url` for asyncio code (cancellable, does not block the loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        url = _listen_url(popen, log_path, pattern, name)
        if url:
            return url
        if time.monotonic() > deadline:
            raise _not_listening(name, timeout_s, log_path)
        await asyncio.sleep(0.05)


def port_free_now(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at this instant; only for `retry_on_port_clash`, which copes
    with losing it before the server binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def retry_on_port_clash(start: Callable[[int], T], *, name: str = "server", attempts: int = PORT_ATTEMPTS,
                        host: str = "127.0.0.1") -> T:
    """`start(port)` on a port free now; again on a new port while it raises PortInUse.

    `start` must return only once the server is up on that port, and raise PortInUse when the
    server exited because the port was taken (any other failure propagates at once). After
    `attempts` clashes, raises PortInUse naming every port tried.
    """
    tried: list[int] = []
    last: PortInUse | None = None
    for _ in range(attempts):
        port = port_free_now(host)
        tried.append(port)
        try:
            return start(port)
        except PortInUse as exc:
            last = exc
    raise PortInUse(f"{name} could not bind a port in {attempts} attempts (tried {tried}; each was taken by "
                    f"another process before the server bound it); last error: {last}") from last
