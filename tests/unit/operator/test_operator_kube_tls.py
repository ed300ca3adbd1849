"""How the operator's API client finds and authenticates to the API server (kubernetes_asyncio).

A small HTTPS server on loopback stands in for the API server; what is tested is ours and
the client's part: the in-cluster service account (CA file, a token that the kubelet rotates),
kubeconfig with an inline client certificate (mutual TLS), and fresh credentials after a 401.
"""

from __future__ import annotations

import datetime
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from kubernetes_asyncio.config import incluster_config

from saber_operator.kube import KubeClient, KubeError, load_configuration

CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "ns"}, "data": {"k": "v"}}


def make_cert(tmp: Path, name: str, cn: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make certificates for this test")
    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True)
    return crt, key


class FakeAPI:
    """Answers one ConfigMap GET; records the Authorization header; accepts only `tokens`."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.tokens: set[str] | None = None  # None: any
        self.peer_certs: list[dict] = []

    async def handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.seen.append(auth)
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        if peer:
            self.peer_certs.append(peer)
        if self.tokens is not None and auth not in {f"Bearer {t}" for t in self.tokens}:
            return web.json_response({"kind": "Status", "code": 401, "message": "Unauthorized"}, status=401)
        return web.json_response(CONFIGMAP)

    async def start(self, ssl_context: ssl.SSLContext | None) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/ns/configmaps/x", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]


async def test_in_cluster_service_account_with_a_rotated_token(tmp_path, monkeypatch):
    crt, key = make_cert(tmp_path, "server", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, key)
    api = FakeAPI()
    runner, port = await api.start(server_ctx)
    token = tmp_path / "token"
    token.write_text("first")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    # The client re-reads the token file once its copy is older than this (a minute in a pod).
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    kube = KubeClient(lambda: load_configuration(token_filename=str(token), cert_filename=str(crt)))
    try:
        assert await kube.get("v1", "configmaps", "ns", "x") == CONFIGMAP  # TLS verified with the SA's CA
        token.write_text("second")  # the kubelet rotates the projected token
        assert await kube.get("v1", "configmaps", "ns", "x") == CONFIGMAP
        assert api.seen == ["Bearer first", "Bearer second"]
    finally:
        await kube.close()
        await runner.cleanup()


async def test_in_cluster_refuses_a_server_the_service_account_ca_did_not_sign(tmp_path, monkeypatch):
    crt, key = make_cert(tmp_path, "server", "127.0.0.1")
    other_ca, _ = make_cert(tmp_path, "other", "someone-else")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, key)
    runner, port = await FakeAPI().start(server_ctx)
    (tmp_path / "token").write_text("t")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(port))
    kube = KubeClient(lambda: load_configuration(token_filename=str(tmp_path / "token"), cert_filename=str(other_ca)))
    try:
        with pytest.raises(KubeError, match="(?i)certificate"):
            await kube.get("v1", "configmaps", "ns", "x")
    finally:
        await kube.close()
        await runner.cleanup()


def kubeconfig(path: Path, server: str, user: dict) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server, **user.pop("cluster", {})}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }))


async def test_kubeconfig_inline_client_certificate_mutual_tls(tmp_path, monkeypatch):
    import base64

    server_crt, server_key = make_cert(tmp_path, "server", "127.0.0.1")
    client_crt, client_key = make_cert(tmp_path, "client", "saber-operator")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_crt, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(client_crt)
    api = FakeAPI()
    runner, port = await api.start(server_ctx)
    b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
    config = tmp_path / "config"
    kubeconfig(config, f"https://127.0.0.1:{port}", {
        "cluster": {"certificate-authority-data": b64(server_crt)},
        "client-certificate-data": b64(client_crt), "client-key-data": b64(client_key),
    })
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube = KubeClient(lambda: load_configuration(kubeconfig=str(config)))
    try:
        assert await kube.get("v1", "configmaps", "ns", "x") == CONFIGMAP
        assert api.peer_certs and ("commonName", "saber-operator") in api.peer_certs[0]["subject"][0]
    finally:
        await kube.close()
        await runner.cleanup()


async def test_kubeconfig_credentials_reloaded_after_401(tmp_path, monkeypatch):
    api = FakeAPI()
    runner, port = await api.start(None)
    config = tmp_path / "config"
    kubeconfig(config, f"http://127.0.0.1:{port}", {"token": "old"})
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube = KubeClient(lambda: load_configuration(kubeconfig=str(config)))
    try:
        assert await kube.get("v1", "configmaps", "ns", "x") == CONFIGMAP
        # The token expires and a fresh one lands in kubeconfig (as `kubectl` or an exec plugin would).
        api.tokens = {"new"}
        kubeconfig(config, f"http://127.0.0.1:{port}", {"token": "new"})
        assert await kube.get("v1", "configmaps", "ns", "x") == CONFIGMAP
        assert api.seen == ["Bearer old", "Bearer old", "Bearer new"]
    finally:
        await kube.close()
        await runner.cleanup()


async def test_plain_api_server_url_and_the_generic_request():
    api = FakeAPI()
    runner, port = await api.start(None)
    kube = KubeClient(lambda: load_configuration(f"http://127.0.0.1:{port}"))
    try:
        assert await kube.request("GET", "/api/v1/namespaces/ns/configmaps/x") == CONFIGMAP
        assert await kube.get("v1", "configmaps", "ns", "x") == CONFIGMAP
        assert await kube.get("v1", "configmaps", "ns", "missing") is None
        assert api.seen == [None, None]  # no credentials against an emulator URL
    finally:
        await kube.close()
        await runner.cleanup()
