"""A real vLLM OpenAI-compatible server (CPU build) on 127.0.0.1, started from the project's venv.

vLLM takes no `--port 0` that it would report back, so with no port given `VLLMServer.start`
picks a port that is free now and, when vLLM exits because another process took that port
before it bound it, starts again on a new one (`ports.retry_on_port_clash`, bounded). It counts
as up only when /health answers and /v1/models lists its own served name, so another process
answering on the port is never mistaken for it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .ports import PortInUse, address_in_use, retry_on_port_clash
from .vllm_model import child_env, require_vllm_python

DEFAULT_MODEL_NAME = "saber-tiny-llama"
# vLLM's CPU API-server default token budget per step (chunked prefill). The harnesses pass it to
# the server explicitly, so the server and a simulated engine use the same one.
CPU_MAX_NUM_BATCHED_TOKENS = 2048


class VLLMServerError(RuntimeError):
    """The vLLM server died or did not become healthy in time; the message ends with its log."""


class VLLMServer:
    """A real vLLM OpenAI-compatible server (CPU build) on 127.0.0.1, as a context manager.

    `port=None` (the default) lets start() choose one (see the module docstring); a given port
    is used as is, and start() fails if it is taken.

    Flags chosen for a tiny model on a shared 2-core machine (see docs/VLLM_CPU.md):
    float32 (no bf16 kernels needed), --enforce-eager (no torch.compile warm-up, ~40 s saved),
    the in-process executor (one process fewer to start), one OpenMP thread, no CPU pinning.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        served_model_name: str = DEFAULT_MODEL_NAME,
        extra_args: Sequence[str] = (),
        max_model_len: int = 2048,
        max_num_seqs: int = 16,
        threads: int = 1,
        python: Path | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 300.0,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.requested_port = port or None
        self.port: int | None = self.requested_port  # the port in use, once start() chose it
        self.served_model_name = served_model_name
        self.extra_args = list(extra_args)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.threads = threads
        self.python = python
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="vllm-cpu-", suffix=".log")[1])
        self.startup_timeout_s = startup_timeout_s
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the vLLM server has no port yet: start() it first")
        return f"http://127.0.0.1:{self.port}"

    def command(self, python: Path) -> list[str]:
        return [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--dtype", "float32",
            "--enforce-eager",
            "--distributed-executor-backend", "uni",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        threads = str(self.threads)
        return child_env({
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_TARGET_DEVICE": "cpu",
            # GiB of KV cache: 1 GiB holds ~500k tokens of this model, plenty.
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            # Pinning OpenMP threads to cores fights the other processes on a shared machine.
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "TOKENIZERS_PARALLELISM": "false",
            # Lets the engine core run the model in-process (--distributed-executor-backend uni).
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        })

    def start(self) -> VLLMServer:
        if self._proc is not None:
            raise RuntimeError("server already started")
        python = self.python or require_vllm_python()
        launch = functools.partial(self._launch, python)
        try:
            if self.requested_port:
                launch(self.requested_port)
            else:
                retry_on_port_clash(launch, name="vLLM server")
        except PortInUse as exc:
            raise VLLMServerError(f"{exc}; log {self.log_path}") from exc
        return self

    def _launch(self, python: Path, port: int) -> None:
        """One attempt on one port; raises PortInUse if vLLM exited because the port was taken."""
        self.port = port
        self._log = open(self.log_path, "wb")
        started = time.monotonic()
        self._proc = subprocess.Popen(
            self.command(python), env=self.environment(), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches the engine core too
        )
        try:
            self._wait_healthy(started)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _wait_healthy(self, started: float) -> None:
        assert self._proc is not None
        deadline = started + self.startup_timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                if address_in_use(tail):
                    raise PortInUse(f"port {self.port} was taken before vLLM could bind it:\n{tail[-1000:]}")
                raise VLLMServerError(
                    f"vLLM server exited with code {code} before becoming healthy; "
                    f"log {self.log_path}, last lines:\n{tail}")
            if self._answers_as_itself():
                return
            if time.monotonic() > deadline:
                raise VLLMServerError(
                    f"vLLM server not healthy after {self.startup_timeout_s:.0f} s; "
                    f"log {self.log_path}, last lines:\n{self.log_tail()}")
            time.sleep(0.5)

    def _answers_as_itself(self) -> bool:
        """/health is 200 and /v1/models lists our served name (not some other process on the port)."""
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                if resp.status != 200:
                    return False
            with urllib.request.urlopen(self.base_url + "/v1/models", timeout=5) as resp:
                models = json.loads(resp.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError):
            return False
        return any(m.get("id") == self.served_model_name for m in models.get("data", []))

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                tail = deque(f, maxlen=lines)
        except OSError:
            return "(no log)"
        return b"".join(tail).decode(errors="replace")

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL after grace_s."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                _signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    pass
                # The engine core may outlive the API server; clean the group either way.
                _signal_group(pgid, signal.SIGKILL)
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
