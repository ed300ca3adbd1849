"""A config the schema accepts but the policy refuses, at sidecar startup: exit 2 with the reason."""

import subprocess
import sys

BAD = """
classes:
  - name: a
    deadline_seconds: 5
default_class: a
scheduling:
  policy: saber
  speed_model: {form: usl, params: [-1, 0, 0]}
"""


def test_startup_with_a_config_the_policy_refuses_exits_2_with_a_message(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    out = subprocess.run(
        [sys.executable, "-m", "saber_cli.main", "sidecar", "--host", "127.0.0.1", "--port", "0",
         "--engine-url", "http://127.0.0.1:9", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "cannot start" in out.stderr and "no positive speed" in out.stderr
    assert "Traceback" not in out.stderr
