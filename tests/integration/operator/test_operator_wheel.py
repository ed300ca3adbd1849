"""The saber wheel, built and installed into a fresh virtual environment, starts
`saber operator`, `saber sidecar` and `saber emulator` (what the image's entry point runs)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_entry_points_start_from_installed_wheel(tmp_path: Path):
    wheels = tmp_path / "wheels"
    isolation = ["--no-build-isolation"]  # hatchling is a test dependency: no network needed
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    wheel = next(wheels.glob("saber-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # Install the wheel alone into the fresh venv; its dependencies come from the test venv
    # through a .pth line (which does not pull in the editable install of saber itself).
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", target, str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    Path(target, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    saber = venv / "bin" / "saber"
    if not saber.exists():  # pip --target puts console scripts under target/bin
        saber = Path(target) / "bin" / "saber"
        saber.write_text(saber.read_text().replace(saber.read_text().splitlines()[0], f"#!{venv}/bin/python", 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import saber_operator; print(saber_operator.__file__)"],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    assert where.startswith(target), f"saber imported from {where}, not the installed wheel"
    for command in ("operator", "sidecar", "emulator"):
        out = subprocess.run([str(saber), command, "--help"], capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"usage: saber {command}" in out.stdout
