"""The machine a benchmark ran on, for its results (a module of its own so no runner imports the CLI)."""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """Cores, CPU model, OS and Python: every benchmark result records where it ran."""

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} cores{' ' + model if model else ''}, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
