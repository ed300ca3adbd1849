import subprocess
import sys

from saber_cli.main import main


def test_help_lists_usage(capsys):
    assert main([]) == 2
    assert "usage: saber" in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "saber_cli", "--help"], capture_output=True, text=True, check=True)
    assert "SLA-aware serving" in out.stdout
