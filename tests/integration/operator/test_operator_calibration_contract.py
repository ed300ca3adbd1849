"""The calibration Job's command line, run for real: the exact command and arguments
`build_calibration_job` puts in the Job, against a real engine emulator on loopback (the pod IP
becomes 127.0.0.1, /dev/termination-log a temporary file), and its output read back the way the
operator reads a termination message. This is the contract between the operator and
`saber calibrate`: the flags it passes exist, the output is a LatencyProfile under the kubelet's
4 KB, and it reaches the sidecar config.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

from saber_emulator.engine import EngineConfig
from saber_emulator.server import EmulatorServer, EmulatorSettings
from saber_operator.builders import TERMINATION_LOG, Owner, build_calibration_job, build_configmap
from saber_operator.calibration import MAX_PROFILE_BYTES, parse_profile
from saber_operator.spec import parse_spec
from saber_sidecar.config import parse_config

pytestmark = pytest.mark.slow


def saber_command() -> str:
    """The `saber` script of the interpreter running the tests (PATH need not hold the venv)."""
    beside = Path(sys.executable).with_name("saber")
    return str(beside) if beside.exists() else (shutil.which("saber") or "saber")


async def test_job_command_against_a_real_emulator_writes_a_profile_the_sidecar_accepts(tmp_path):
    spec = parse_spec({
        "model": {"name": "coder"},
        "engine": {"kind": "emulator", "maxNumSeqs": 32},
        "sla": {"classes": [{"name": "a", "deadlineSeconds": 2}], "defaultClass": "a"},
        "calibration": {"enabled": True, "maxConcurrency": 8, "durationSeconds": 10},
    })
    owner = Owner("svc", "team-a", "uid-1")
    engine = EmulatorServer(EmulatorSettings(host="127.0.0.1", port=0, model="coder", engine=EngineConfig(max_num_seqs=32)))
    await engine.start()
    try:
        job = build_calibration_job(owner, spec, "127.0.0.1", "enginehash")
        container = job["spec"]["template"]["spec"]["containers"][0]
        out = tmp_path / "termination-log"
        args = [a.replace("127.0.0.1:8000", f"127.0.0.1:{engine.port}").replace(TERMINATION_LOG, str(out))
                for a in container["args"]]
        assert container["command"][0] == "saber"
        saber = saber_command()
        proc = await asyncio.create_subprocess_exec(
            saber, *container["command"][1:], *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=300)
        assert proc.returncode == 0, stderr.decode()[-2000:]
    finally:
        await engine.stop()
    text = out.read_text()
    assert len(text.encode()) < MAX_PROFILE_BYTES
    profile = parse_profile(text)
    assert profile["decode_batch_sizes"][0] >= 1 and profile["prefill_s_per_token"] >= 0
    config = parse_config(build_configmap(owner, spec, profile)["data"]["config.yaml"])
    assert config.scheduling.engine_profile is not None
    assert config.scheduling.engine_profile.decode_batch_sizes == profile["decode_batch_sizes"]
