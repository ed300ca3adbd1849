"""Helpers for the monitoring tests: load the generators in tools/ (plain scripts, not a package)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py under a private module name (tools/ is not on sys.path)."""
    module_name = f"_saber_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def dashboards() -> ModuleType:
    return load_tool("dashboards")


@pytest.fixture(scope="session")
def alerts() -> ModuleType:
    return load_tool("alerts")


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (scripts/install.d/20-prometheus.sh)")
    return path
