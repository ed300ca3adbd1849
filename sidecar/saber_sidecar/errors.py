"""The sidecar's own error answers: one exception carrying what the client is told and which
outcome is recorded, and the OpenAI/vLLM error shape it becomes. Imported by the proxy and the
relay alike (neither imports the other for it)."""

from __future__ import annotations

import json

from aiohttp import web

# Why the sidecar refused or dropped a request, as a machine-readable code (the body's
# `error.code`): saber's own header, and llm-d's name for the same thing, so gateways and load
# tools that read llm-d's header see saber's reason too.
REJECT_REASON_HEADER = "x-saber-reject-reason"
LLMD_DROPPED_REASON_HEADER = "x-llm-d-request-dropped-reason"


class Fail(Exception):
    """Answer with an OpenAI-shaped error and record `outcome`."""

    def __init__(self, status: int, message: str, outcome: str, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.outcome, self.code, self.retry_after = status, message, outcome, code, retry_after


def openai_error(status: int, message: str, code: str) -> dict:
    """The OpenAI/vLLM error shape: `{"error": {"message", "type", "param", "code"}}`."""
    kind = "rate_limit_error" if status == 429 else ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(openai_error(status, message, code), status=status, headers=headers)


def openai_error_bytes(status: int, message: str, code: str) -> bytes:
    """The same shape as bytes, for answers written straight to a transport (no aiohttp request)."""
    return json.dumps(openai_error(status, message, code)).encode()
