"""Which event loop the sidecar runs on (`event_loop` setting)."""

import asyncio
import sys

import pytest

from saber_sidecar.server import run_loop
from saber_sidecar.settings import SidecarSettings


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_uses_uvloop_when_installed():
    pytest.importorskip("uvloop", reason="the sidecar extra installs uvloop")
    assert run_loop(_loop_module(), "auto").startswith("uvloop")


def test_asyncio_forces_the_standard_loop():
    assert run_loop(_loop_module(), "asyncio").startswith("asyncio")


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError
    assert run_loop(_loop_module(), "auto").startswith("asyncio")


def test_uvloop_required_but_missing_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    coro = _loop_module()
    with pytest.raises(OSError, match="pip install uvloop"):
        run_loop(coro, "uvloop")
    coro.close()


def test_setting_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("SABER_SIDECAR_EVENT_LOOP", "asyncio")
    assert SidecarSettings().event_loop == "asyncio"
    monkeypatch.setenv("SABER_SIDECAR_EVENT_LOOP", "fast")
    with pytest.raises(ValueError, match="event_loop"):
        SidecarSettings()
