"""The dashboard and the alert rules against a real Prometheus scraping a live emulator and sidecar.

Starts, on loopback: the engine emulator, the sidecar in front of it, and Debian's Prometheus with
the shipped `manifests/monitoring/prometheus.yml` (its Kubernetes discovery swapped for two static
targets carrying the `__meta_kubernetes_*` labels a pod would have, so the shipped relabelling is
what produces namespace/service/pod/container) and the shipped rules with every `for:` set to 0s.
Drives a bounded load through the `openai` client, then:
  - every dashboard query (template variables substituted) returns data;
  - every alert expression is accepted and evaluates; the SLA alert fires for a class whose
    deadline cannot be met, and no capacity alert fires on a healthy service;
  - a bad config file makes SaberConfigReloadFailing fire; killing the emulator, then the
    sidecar, makes SaberEngineDown and SaberSidecarDown fire.
The read-only checks share one module-scoped stack (and one load, the `loaded` fixture, run by
whichever test asks first); each test that breaks something gets a fresh stack of its own, so
every test passes alone and in any order. The emulator and the sidecar bind port 0 and report
their URLs; Prometheus needs a port number and is restarted on a new one if it loses a race for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from saber_bench.ports import PortInUse, ServerStartError, address_in_use, retry_on_port_clash, wait_for_listen_url

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[3]
LABELS = {"namespace": "llm", "service": "coder", "pod": "coder-0"}
RATE_INTERVAL = "30s"  # what Grafana's $__rate_interval would be for a 1 s scrape over a short range
MODEL = "tiny-coder"
SIDECAR_CONFIG = """
classes:
  - name: fast
    deadline_seconds: 10
    output_tokens: 24
  - name: tight           # no engine finishes 24 tokens in 50 ms: attainment 0, the SLA alert fires
    deadline_seconds: 0.05
    output_tokens: 24
default_class: fast
scheduling:
  policy: saber
  speed_model:            # refit early, so the R² gauge exists after a short load
    window: 16
    min_samples: 8
    refit_every: 4
"""


def _load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_saber_tools_{name}_it", ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_for(what: str, check, timeout: float, logs: list[Path] = ()) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {last!r})\n{tails}")


@dataclass
class Stack:
    tmp: Path
    config_path: Path
    prom_url: str = ""
    sidecar_url: str = ""
    engine_url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        with log.open("wb") as sink:
            self.procs[name] = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.tmp
            )
        return self.procs[name]

    def start_saber(self, name: str, args: list[str]) -> str:
        """`saber <args>` on a port it binds itself (--port 0); returns the URL it prints."""
        proc = self.start(name, [sys.executable, "-m", "saber_cli", *args, "--host", "127.0.0.1", "--port", "0"])
        try:
            return wait_for_listen_url(proc, self.logs[name], name=name, timeout_s=30)
        except ServerStartError as exc:
            pytest.fail(f"{exc}\n{self.tails()}")

    def stop(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {name}.log\n{path.read_text()[-chars:]}" for name, path in self.logs.items())

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = _get(url)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", f"Prometheus rejected {expr!r}: {data}"
        return data["data"]["result"]

    def api(self, path: str) -> Any:
        status, body = _get(f"{self.prom_url}{path}")
        assert status == 200, body
        return json.loads(body)["data"]

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, Any]]:
        return [a for a in self.api("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == name and a["state"] == state]


def _meta_labels(container: str, port_name: str, app: str = "saber") -> dict[str, str]:
    """The discovery labels Kubernetes pod SD would give this container port."""
    return {
        "__meta_kubernetes_namespace": LABELS["namespace"],
        "__meta_kubernetes_pod_name": LABELS["pod"],
        "__meta_kubernetes_pod_container_name": container,
        "__meta_kubernetes_pod_container_port_name": port_name,
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": "serving",
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance": LABELS["service"],
    }


# The decoy target is dropped by relabelling before any scrape, so its port is never contacted.
DECOY_PORT = 9


def _prometheus_config(engine_port: int, sidecar_port: int, decoy_port: int = DECOY_PORT) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "manifests" / "monitoring" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    (job,) = config["scrape_configs"]
    assert "kubernetes_sd_configs" in job, "prometheus.yml no longer discovers pods; update this test"
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [
        {"targets": [f"127.0.0.1:{sidecar_port}"], "labels": _meta_labels("sidecar", "http")},
        {"targets": [f"127.0.0.1:{engine_port}"], "labels": _meta_labels("engine", "engine")},
        # Another app's pod: the shipped relabelling must drop it.
        {"targets": [f"127.0.0.1:{decoy_port}"], "labels": _meta_labels("web", "http", app="other")},
    ]
    return config


def _start_prometheus(stack: Stack, binary: str, port: int) -> str:
    """Prometheus on `port` (it cannot bind port 0); PortInUse if another process took the port first."""
    data = stack.tmp / f"data-{port}"
    proc = stack.start("prometheus", [
        binary, f"--config.file={stack.tmp / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ])
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            log = stack.logs["prometheus"].read_text()
            if address_in_use(log):
                raise PortInUse(f"port {port}: {log.strip()[-300:]}")
            pytest.fail(f"Prometheus exited with code {proc.returncode}\n{stack.tails()}")
        if _get(f"{url}/-/ready")[0] != 200:
            return False
        # Ours, not another process that answers on the port: it reports our data directory.
        flags = json.loads(_get(f"{url}/api/v1/status/flags")[1])["data"]
        return flags.get("storage.tsdb.path") == str(data)

    _wait_for("Prometheus", ready, 30, list(stack.logs.values()))
    return url


@contextlib.contextmanager
def _running_stack(tmp: Path) -> Iterator[Stack]:
    """Emulator, sidecar and Prometheus, up, with Prometheus scraping both; all stopped on exit."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus not found: install Debian's prometheus package (scripts/install.d/20-prometheus.sh)")
    alerts = _load_tool("alerts")
    s = Stack(tmp=tmp, config_path=tmp / "sidecar.yaml")
    s.config_path.write_text(SIDECAR_CONFIG)
    (tmp / "prometheus-rules.yaml").write_text(yaml.safe_dump(alerts.rules_file(for_override="0s"), sort_keys=False))
    try:
        # The emulator and the sidecar bind port 0 themselves and print their URLs: no port race.
        s.engine_url = s.start_saber("emulator", ["emulator", "--model", MODEL])
        s.sidecar_url = s.start_saber(
            "sidecar", ["sidecar", "--engine-url", s.engine_url, "--config", str(s.config_path)]
        )
        engine_port, sidecar_port = (urllib.parse.urlsplit(u).port for u in (s.engine_url, s.sidecar_url))
        (tmp / "prometheus.yml").write_text(
            yaml.safe_dump(_prometheus_config(engine_port, sidecar_port), sort_keys=False)
        )
        s.prom_url = retry_on_port_clash(functools.partial(_start_prometheus, s, prometheus), name="Prometheus")
        logs = list(s.logs.values())
        _wait_for("the sidecar", lambda: _get(f"{s.sidecar_url}/readyz")[0] == 200, 30, logs)
        # Every test starts from both targets scraped as up (so each outage is a change Prometheus sees).
        _wait_for(
            "both targets up",
            lambda: sum(a["health"] == "up" for a in s.api("/api/v1/targets")["activeTargets"]) == 2,
            20,
            logs,
        )
        yield s
    finally:
        for name in ("prometheus", "sidecar", "emulator"):
            s.stop(name)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    """The shared stack: healthy for the whole module. Tests on it only read; none breaks it."""
    with _running_stack(tmp_path_factory.mktemp("monitoring")) as s:
        yield s


@pytest.fixture
def own_stack(tmp_path) -> Iterator[Stack]:
    """A fresh stack for one test that breaks something (bad config, killed processes)."""
    with _running_stack(tmp_path) as s:
        yield s


def _drive_load(sidecar_url: str, requests: int = 96, workers: int = 8, budget_s: float = 40.0) -> dict[str, int]:
    """A bounded mix of classes, streaming and not; returns how requests ended."""
    import openai

    client = openai.OpenAI(base_url=f"{sidecar_url}/v1", api_key="unused", max_retries=0, timeout=20.0)
    deadline = time.monotonic() + budget_s

    def one(i: int) -> str:
        if time.monotonic() > deadline:
            return "skipped"
        sla_class = "tight" if i % 4 == 0 else "fast"
        try:
            kwargs = dict(
                model=MODEL,
                messages=[{"role": "user", "content": f"def f{i}(x):"}],
                max_tokens=24,
                extra_headers={"x-saber-sla-class": sla_class},
            )
            if i % 2:
                list(client.chat.completions.create(stream=True, **kwargs))
            else:
                client.chat.completions.create(**kwargs)
            return "ok"
        except openai.APIStatusError as exc:
            return f"http {exc.status_code}"

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, range(requests)))
    return {r: results.count(r) for r in set(results)}


@pytest.fixture(scope="module")
def loaded(stack: Stack) -> dict[str, int]:
    """The shared stack after one bounded load (driven by whichever test first asks for it)."""
    outcome = _drive_load(stack.sidecar_url)
    # Two more scrapes, so the last counts are in.
    time.sleep(2.5)
    return outcome


def _substitute(expr: str) -> str:
    for name, value in LABELS.items():
        expr = expr.replace(f"${name}", value)
    return expr.replace("$__rate_interval", RATE_INTERVAL)


def test_shipped_relabelling_yields_the_dashboard_labels(stack: Stack):
    targets = _wait_for(
        "both targets up",
        lambda: (t := stack.api("/api/v1/targets"))
        and sum(a["health"] == "up" for a in t["activeTargets"]) == 2
        and t,
        20,
        list(stack.logs.values()),
    )
    active = {a["labels"]["container"]: a["labels"] for a in targets["activeTargets"]}
    assert set(active) == {"sidecar", "engine"}
    for labels in active.values():
        for key, value in LABELS.items():
            assert labels[key] == value, labels
    dropped = [d["discoveredLabels"].get("__meta_kubernetes_pod_label_app_kubernetes_io_name") for d in targets["droppedTargets"]]
    assert dropped == ["other"]


def test_every_dashboard_query_returns_data(stack: Stack, loaded: dict[str, int]):
    assert loaded.get("ok", 0) >= 48, f"load did not get through the sidecar: {loaded}\n{stack.tails()}"
    dashboards = _load_tool("dashboards")
    empty, no_number = [], []
    queries = list(dashboards.iter_queries(dashboards.dashboard()))
    assert len(queries) >= 25
    for title, expr in queries:
        result = stack.query(_substitute(expr))
        if not result:
            empty.append(f"{title}: {expr}")
        elif not any(math.isfinite(float(r["value"][1])) for r in result):
            no_number.append(f"{title}: {expr} -> {result}")
    assert not empty, "queries with no data:\n" + "\n".join(empty)
    assert not no_number, "queries with only NaN/Inf:\n" + "\n".join(no_number)


def test_template_variable_queries_offer_the_live_values(stack: Stack, loaded: dict[str, int]):
    dashboards = _load_tool("dashboards")
    for var in dashboards.templating()["list"]:
        if var["type"] != "query":
            continue
        # label_values(SELECTOR, LABEL) is Grafana's call of /api/v1/label/LABEL/values?match[]=SELECTOR
        inner = var["query"]["query"][len("label_values("):-1]
        selector, label = (part.strip() for part in inner.rsplit(",", 1))
        match = urllib.parse.urlencode({"match[]": _substitute(selector)})
        values = stack.api(f"/api/v1/label/{label}/values?{match}")
        assert LABELS[label] in values, f"variable {var['name']}: {values}"


def test_alert_expressions_evaluate_and_the_sla_alert_fires(stack: Stack, loaded: dict[str, int]):
    alerts = _load_tool("alerts")
    for rule in alerts.alert_rules():
        stack.query(rule["expr"])  # asserts Prometheus accepts it
    assert stack.query("saber_speed_model_r2"), "no R² exported after the load"
    assert stack.query(f"deriv(saber_queue_depth[{RATE_INTERVAL}])"), "queue depth not scraped"
    firing = _wait_for(
        "SaberSLAAttainmentBelowTarget firing for class tight",
        lambda: [a for a in stack.alerts("SaberSLAAttainmentBelowTarget") if a["labels"]["class"] == "tight"],
        15,
    )
    assert firing[0]["labels"]["service"] == "coder" and float(firing[0]["value"]) < 0.95
    assert firing[0]["annotations"]["runbook"]
    # A healthy service under light load: none of the capacity or health alerts may fire.
    for name in ("SaberQueueGrowing", "SaberSpeedModelPoorFit", "SaberEngineDown", "SaberSidecarDown",
                 "SaberConfigReloadFailing"):
        assert not stack.alerts(name), f"{name} fires on a healthy service"


def test_bad_config_fires_reload_failure(own_stack: Stack):
    stack = own_stack
    assert not stack.alerts("SaberConfigReloadFailing")
    stack.config_path.write_text("classes: [{name: Not_A_DNS_Label, deadline_seconds: -1}]\ndefault_class: x\n")
    firing = _wait_for("SaberConfigReloadFailing firing", lambda: stack.alerts("SaberConfigReloadFailing"), 20,
                       [stack.logs["sidecar"]])
    assert firing[0]["labels"]["pod"] == "coder-0" and firing[0]["labels"]["result"] == "failure"
    # The sidecar keeps serving with its last good config.
    assert _get(f"{stack.sidecar_url}/readyz")[0] == 200


def test_outages_fire_engine_and_sidecar_down(own_stack: Stack):
    stack = own_stack
    stack.stop("emulator")
    firing = _wait_for("SaberEngineDown firing", lambda: stack.alerts("SaberEngineDown"), 20)
    assert {k: firing[0]["labels"][k] for k in (*LABELS, "container")} == {**LABELS, "container": "engine"}
    assert not stack.alerts("SaberSidecarDown")
    stack.stop("sidecar")
    firing = _wait_for("SaberSidecarDown firing", lambda: stack.alerts("SaberSidecarDown"), 20)
    assert firing[0]["labels"]["container"] == "sidecar"
