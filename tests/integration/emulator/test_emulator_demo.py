"""`saber emulator demo` runs end to end as a user runs it."""

import subprocess
import sys


def test_saber_demo_prints_a_table_and_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "saber_cli.main", "emulator", "demo", "--requests", "4", "--max-tokens", "16"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "TTFT s" in out and "tok/s" in out
    rows = [line for line in out.splitlines() if line.strip().split(" ")[0].isdigit() and ("length" in line or "stop" in line)]
    assert len(rows) == 4
    assert "vllm:generation_tokens_total" in out and "vllm:request_success_total{finished_reason=length}" in out
