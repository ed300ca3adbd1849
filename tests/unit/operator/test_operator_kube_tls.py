"""The operator's TLS set-up with an inline client certificate (kubeconfig `client-*-data`)."""

import os
import shutil
import subprocess
import tempfile

import pytest

from saber_operator.kube import Connection


@pytest.fixture
def client_pair(tmp_path):
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make a client certificate for this test")
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=saber-test",
                    "-days", "1", "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    return crt.read_bytes(), key.read_bytes()


def test_inline_client_certificate_loads_and_leaves_no_key_on_disk(client_pair, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    crt, key = client_pair
    ctx = Connection(server="https://127.0.0.1:6443", certificate_data=crt, private_key_data=key).ssl_context()
    assert ctx is not False
    assert os.listdir(scratch) == []


def test_plain_http_and_insecure_need_no_tls():
    assert Connection(server="http://127.0.0.1:8080").ssl_context() is False
    assert Connection(server="https://127.0.0.1:6443", insecure=True).ssl_context() is False
