"""Starting servers without free-port races (saber_bench.ports), with real processes on loopback."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from saber_bench import ports


def _start_http_server(port: int, log_path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def test_a_lost_port_race_is_retried_on_a_new_port(tmp_path, monkeypatch):
    # The race, provoked on purpose: the first port offered is already taken by another listener,
    # as if another process had bound it between our pick and the server's bind.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    offered = iter([taken])
    real_pick = ports.port_free_now
    monkeypatch.setattr(ports, "port_free_now", lambda host="127.0.0.1": next(offered, None) or real_pick(host))
    started: list[subprocess.Popen] = []

    def start(port: int) -> int:
        log = tmp_path / f"http-{port}.log"
        proc = _start_http_server(port, log)
        started.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                if ports.address_in_use(log.read_text()):
                    raise ports.PortInUse(f"port {port} taken")
                pytest.fail(f"http.server exited with {proc.returncode}: {log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    if resp.status == 200 and proc.poll() is None:
                        return port
            except OSError:
                pass
            time.sleep(0.1)
        pytest.fail(f"http.server on {port} did not answer")

    try:
        port = ports.retry_on_port_clash(start, name="http.server")
        assert port != taken
        assert len(started) == 2
        assert started[0].returncode is not None  # the first lost the race and exited
        assert started[1].poll() is None
    finally:
        for proc in started:
            _stop(proc)
        held.close()


def test_retries_are_bounded_and_the_error_names_the_ports_tried():
    calls: list[int] = []

    def always_taken(port: int):
        calls.append(port)
        raise ports.PortInUse(f"port {port} taken")

    with pytest.raises(ports.PortInUse) as err:
        ports.retry_on_port_clash(always_taken, name="demo", attempts=3)
    assert len(calls) == 3
    assert "demo could not bind a port in 3 attempts" in str(err.value)
    assert all(str(p) in str(err.value) for p in calls)


def test_the_emulator_reports_the_port_it_bound(tmp_path):
    log = tmp_path / "emulator.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "saber_cli", "emulator", "--host", "127.0.0.1", "--port", "0"],
                                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = ports.wait_for_listen_url(proc, log, name="emulator", timeout_s=30)
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            assert resp.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_early_exit_is_reported_with_its_log(tmp_path):
    log = tmp_path / "dies.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; print('no config'); sys.exit(3)"],
                                stdout=sink, stderr=subprocess.STDOUT)
    with pytest.raises(ports.ServerStartError, match=r"(?s)dies exited with code 3.*no config"):
        ports.wait_for_listen_url(proc, log, name="dies", timeout_s=10)
