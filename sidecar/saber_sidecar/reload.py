"""Hot reload of the config file.

A mounted ConfigMap is updated by swapping a symlink, which can leave the file's mtime alone, so
the watcher compares a hash of the content. Each new content is parsed once: a good one is
applied, a bad one is refused (logged and counted) and the last good config stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from saber_sidecar.background import BackgroundLoop
from saber_sidecar.config import ConfigError, SidecarConfig, parse_config

log = logging.getLogger(__name__)


class ConfigWatcher(BackgroundLoop):
    task_name = "saber-config-watcher"

    def __init__(
        self,
        path: str | Path,
        apply: Callable[[SidecarConfig], None],
        on_result: Callable[[str], None],
        interval_s: float = 1.0,
        initial_text: str | None = None,
    ) -> None:
        self.path = Path(path)
        self._apply = apply
        self._on_result = on_result
        self._interval = interval_s
        self._seen: str | None = _digest(initial_text.encode()) if initial_text is not None else None
        self.last_error: str | None = None

    def check(self) -> str | None:
        """Look at the file once; returns "success", "failure" or None (unchanged)."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            key = f"unreadable:{exc.errno}"
            if key == self._seen:
                return None
            self._seen = key
            return self._refuse(f"{self.path}: cannot read: {exc.strerror or exc}")
        digest = _digest(data)
        if digest == self._seen:
            return None
        self._seen = digest
        try:
            config = parse_config(data.decode("utf-8", errors="replace"), str(self.path))
            self._apply(config)
        except (ConfigError, ValueError) as exc:
            return self._refuse(str(exc))
        self.last_error = None
        log.info("config reloaded from %s: classes %s, policy %s", self.path,
                 ", ".join(c.name for c in config.classes), config.scheduling.policy)
        self._on_result("success")
        return "success"

    def _refuse(self, message: str) -> str:
        self.last_error = message
        log.error("config reload refused, keeping the last good config: %s", message)
        self._on_result("failure")
        return "failure"

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.check()
            except Exception:
                log.exception("config watcher failed")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
