"""vLLM cannot report a port it chose, so VLLMServer picks one and must notice when it loses it.

Here the port is taken on purpose before vLLM starts: vLLM exits at its bind, and start() says
so plainly (with no port given it would try a new one; see tests/integration/bench/test_ports.py).
"""

import socket

import pytest

from saber_bench.vllm_cpu import VLLMServer, VLLMServerError

pytestmark = pytest.mark.vllm


def test_a_taken_port_is_reported_as_taken(tiny_model_dir, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        server = VLLMServer(tiny_model_dir, port, log_path=tmp_path / "vllm.log", startup_timeout_s=120)
        with pytest.raises(VLLMServerError, match=f"port {port} was taken before vLLM could bind it"):
            server.start()
        assert not server.running()
