"""The image: no container engine runs here, so the Dockerfile is checked as text (non-root,
`saber` entry point); tests/integration/operator/test_operator_wheel.py starts the commands
from a built wheel."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_dockerfile_is_plain_and_non_root():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    user = [line for line in final if line.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["saber"]' in final
    assert any("[sidecar,operator,emulator]" in line for line in final)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
