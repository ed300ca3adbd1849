"""Operator benchmark: N SaberServices against the emulated Kubernetes API.

    python -m saber_bench.perf.operator --count 200 --out out/operator-perf

Starts kmock's API emulator on loopback (see `saber_bench.perf.kubeapi`; no real API server can run here),
runs `saber operator` as its own process against it, creates N SaberServices at once and
measures the time until every one is reconciled (its ConfigMap, Deployment and Service exist
and status.observedGeneration is set), then changes every SLA and measures the time until
every ConfigMap carries the change. The operator's resident memory is sampled from /proc.
Writes `operator_perf.json` in the output folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import kmock

from saber_bench.measuring import cpu_seconds, percentile
from saber_bench.perf.kubeapi import CONFIGMAPS, DEPLOYMENTS, SABER, SERVICES, SaberAPIEmulator

NS = "perf"


def body(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "saber.dev/v1alpha1",
        "kind": "SaberService",
        "metadata": {"name": f"svc-{i:04d}", "namespace": NS},
        "spec": {
            "model": {"name": "coder"},
            "engine": {"kind": "emulator"},
            "sla": {"classes": [{"name": "fast", "deadlineSeconds": 1.0}], "defaultClass": "fast"},
        },
    }


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def cpu_used(pid: int) -> float:
    """CPU seconds of the operator process, which runs throughout the measurement."""
    used = cpu_seconds(pid)
    if used is None:
        raise RuntimeError(f"the operator process {pid} exited during the benchmark")
    return used


def live(emu: SaberAPIEmulator, resource: str, name: str) -> dict[str, Any] | None:
    key = (kmock.resource(resource), NS, name)
    if key not in emu.objects or emu.objects[key].deleted:
        return None
    return emu.objects[key].raw


def must_live(emu: SaberAPIEmulator, resource: str, name: str) -> dict[str, Any]:
    obj = live(emu, resource, name)
    if obj is None:
        raise RuntimeError(f"{resource} {name} is missing (or being deleted) in the API emulator")
    return obj


def reconciled(emu: SaberAPIEmulator, name: str, generation: int) -> bool:
    svc = live(emu, SABER, name)
    return bool(
        svc and (svc.get("status") or {}).get("observedGeneration") == generation
        and live(emu, DEPLOYMENTS, name) and live(emu, SERVICES, name) and live(emu, CONFIGMAPS, f"{name}-sidecar")
    )


async def wait_all(
    emu: SaberAPIEmulator, names: list[str], done, timeout: float, pid: int, peak: list[int], start: float
) -> dict[str, float]:
    finished: dict[str, float] = {}
    while len(finished) < len(names):
        now = time.monotonic() - start
        for name in names:
            if name not in finished and done(name):
                finished[name] = now
        peak[0] = max(peak[0], rss_kib(pid)[0])
        if now > timeout:
            break
        await asyncio.sleep(0.05)
    return finished


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": round(percentile(values, 50), 3), "p90": round(percentile(values, 90), 3),
            "p99": round(percentile(values, 99), 3), "max": round(max(values), 3)}


async def run(count: int, out: Path, interval: float, timeout: float) -> dict[str, Any]:
    emu = SaberAPIEmulator(keep_requests=64)
    async with emu, kmock.Server(emu) as server, aiohttp.ClientSession() as http:
        url = str(server.url).rstrip("/")
        env = {**os.environ, "SABER_OPERATOR_TIMER_INTERVAL_SECONDS": str(interval)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "saber_cli", "operator", "--api-server", url],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("SABER_PERF_LOG", os.devnull), "w"), text=True,
        )
        try:
            await asyncio.sleep(3.0)  # start-up: imports, login, discovery
            if proc.poll() is not None:
                raise RuntimeError(f"operator exited: {proc.stderr.read() if proc.stderr else ''}")
            idle_rss = rss_kib(proc.pid)[0]
            cpu_start = cpu_used(proc.pid)
            names = [f"svc-{i:04d}" for i in range(count)]
            peak = [idle_rss]

            t0 = time.monotonic()
            sem = asyncio.Semaphore(16)

            async def create(i: int) -> None:
                async with sem, http.post(f"{url}/apis/saber.dev/v1alpha1/namespaces/{NS}/saberservices", json=body(i)) as r:
                    r.raise_for_status()

            await asyncio.gather(*(create(i) for i in range(count)))
            created_s = time.monotonic() - t0
            done = await wait_all(emu, names, lambda n: reconciled(emu, n, 1), timeout, proc.pid, peak, t0)
            create_total = max(done.values()) if len(done) == count else None
            cpu_create = cpu_used(proc.pid) - cpu_start

            # Change every SLA: the ConfigMaps must follow (hot reload path), the Deployments must not.
            templates = {n: json.dumps(must_live(emu, DEPLOYMENTS, n)["spec"]["template"], sort_keys=True) for n in names}
            patch = {"spec": {"sla": {"classes": [{"name": "fast", "deadlineSeconds": 2.0}], "defaultClass": "fast"}}}

            async def change(name: str) -> None:
                headers = {"Content-Type": "application/merge-patch+json"}
                async with sem, http.patch(
                    f"{url}/apis/saber.dev/v1alpha1/namespaces/{NS}/saberservices/{name}", json=patch, headers=headers
                ) as r:
                    r.raise_for_status()

            t1 = time.monotonic()
            await asyncio.gather(*(change(n) for n in names))
            updated = await wait_all(
                emu, names,
                lambda n: "deadline_seconds: 2.0" in (live(emu, CONFIGMAPS, f"{n}-sidecar") or {}).get("data", {}).get("config.yaml", "")
                and reconciled(emu, n, 2),
                timeout, proc.pid, peak, t1,
            )
            rolled = sum(json.dumps(must_live(emu, DEPLOYMENTS, n)["spec"]["template"], sort_keys=True) != templates[n] for n in names)
            rss_end, hwm = rss_kib(proc.pid)
            cpu_total = cpu_used(proc.pid) - cpu_start
            result = {
                "command": f"python -m saber_bench.perf.operator --count {count} --out {out}",
                "api": "kmock KubernetesEmulator (in-memory API on loopback), not a real kube-apiserver",
                "count": count,
                "timer_interval_seconds": interval,
                "create_requests_seconds": round(created_s, 3),
                # Times count from the first create (or patch) request sent.
                "all_reconciled_seconds": round(create_total, 3) if create_total is not None else None,
                "reconciled": len(done),
                "reconciled_at_seconds": percentiles(list(done.values())),
                "sla_change_all_applied_seconds": round(max(updated.values()), 3) if len(updated) == count else None,
                "sla_change_applied": len(updated),
                "deployments_rolled_by_sla_change": rolled,
                # The emulated API and this harness share the machine: the operator's own CPU time
                # tells its cost apart from theirs.
                "operator_cpu_seconds_create_phase": round(cpu_create, 2),
                "operator_cpu_seconds_both_phases": round(cpu_total, 2),
                "operator_rss_idle_mib": round(idle_rss / 1024, 1),
                "operator_rss_peak_mib": round(max(peak[0], rss_end) / 1024, 1),
                "operator_rss_end_mib": round(rss_end / 1024, 1),
                "operator_vmhwm_mib": round(hwm / 1024, 1),
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            }
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    out.mkdir(parents=True, exist_ok=True)
    (out / "operator_perf.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saber_bench.perf.operator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="SaberServices to create (default 200)")
    parser.add_argument("--out", type=Path, default=Path("out/operator-perf"), help="output folder")
    parser.add_argument("--interval", type=float, default=30.0, help="operator timer interval, seconds (default 30)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds per phase")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    result = asyncio.run(run(args.count, args.out, args.interval, args.timeout))
    print(json.dumps(result, indent=2))
    ok = result["reconciled"] == args.count and result["sla_change_applied"] == args.count
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
