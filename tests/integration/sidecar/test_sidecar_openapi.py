"""Schemathesis over the sidecar's OpenAI-compatible API (the part of OpenAI's API it serves,
written down below as OpenAPI 3): schema-valid requests (positive mode) must be served, and
schema-invalid ones (negative mode) must never get a 5xx; every 4xx carries a reason in the
OpenAI error shape. Against the real sidecar in front of the real emulator (a fast flat profile).

Cases come from schemathesis' generators and are sent with aiohttp on the test's own loop (the
sidecar runs in-process); `max_examples` keeps the whole file well under 60 s.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from saber_emulator.server import EmulatorServer
from sidecar_support import MODEL, emulator_settings, emulator_url

pytestmark = pytest.mark.timeout(120)

SLO_HEADER_PARAMS = [
    {"name": name, "in": "header", "required": False,
     "schema": {"type": "number", "minimum": 1, "maximum": 3_600_000}}
    for name in ("x-saber-deadline-ms", "x-saber-ttft-ms", "x-llm-d-slo-ttft-ms", "x-llm-d-slo-tpot-ms",
                 "x-slo-ttft-ms", "x-slo-tpot-ms")
] + [{"name": "x-saber-sla-class", "in": "header", "required": False,
      "schema": {"type": "string", "enum": ["interactive", "batch"]}}]

PROMPT = {"type": "string", "minLength": 1, "maxLength": 200}  # vLLM (and the emulator) refuse empty prompts
COMMON = {
    "model": {"type": "string", "enum": [MODEL, "coder-fast"]},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
    "stream": {"type": "boolean"},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string", "minLength": 1}}}}}


def operation(body_schema: dict) -> dict:
    return {
        "parameters": SLO_HEADER_PARAMS,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}},
        "responses": {"200": {"description": "a completion (JSON, or SSE when stream is true)"},
                      "4XX": {"description": "the client's mistake, OpenAI-shaped",
                              "content": {"application/json": {"schema": ERROR}}}},
    }


SPEC = {
    "openapi": "3.0.3",
    "info": {"title": "saber sidecar (OpenAI-compatible subset)", "version": "1"},
    "paths": {
        "/v1/completions": {"post": operation({
            "type": "object", "required": ["model", "prompt", "max_tokens"], "additionalProperties": False,
            "properties": {**COMMON, "prompt": PROMPT}})},
        "/v1/chat/completions": {"post": operation({
            "type": "object", "required": ["model", "messages", "max_tokens"], "additionalProperties": False,
            "properties": {**COMMON, "messages": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "required": ["role", "content"], "additionalProperties": False,
                "properties": {"role": {"type": "string", "enum": ["user", "system", "assistant"]},
                               "content": PROMPT}}}}})},
    },
}
SCHEMA = schemathesis.openapi.from_dict(SPEC)
OPS = [SCHEMA[path]["POST"] for path in SPEC["paths"]]
RUN = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture
async def api(start_sidecar, tmp_path):
    profile = tmp_path / "flat.json"
    profile.write_text(json.dumps({"name": "flat-0.2ms", "description": "fast flat step",
                                   "decode_batch_sizes": [1], "decode_step_s": [0.0002],
                                   "prefill_s_per_token": 0.0, "context_s_per_token": 0.0,
                                   "prefill_only_step_s": None}))
    engine = EmulatorServer(emulator_settings(max_model_len=512).model_copy(update={"profile": str(profile)}))
    await engine.start()
    sidecar = await start_sidecar(emulator_url(engine))
    async with aiohttp.ClientSession() as session:
        yield sidecar.url, session
    await engine.stop()


async def send(session: aiohttp.ClientSession, base: str, case) -> tuple[int, bytes, str]:
    headers = {k: str(v) for k, v in (case.headers or {}).items()}
    body = case.body
    data = body if isinstance(body, (bytes, bytearray)) else json.dumps(body).encode()
    async with asyncio.timeout(20):  # never a hang
        async with session.post(base + case.path, data=data,
                                headers={"Content-Type": "application/json", **headers}) as r:
            return r.status, await r.read(), r.content_type


def assert_error_shape(payload: bytes) -> None:
    error = json.loads(payload)["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.path)
@RUN
@given(data=st.data())
async def test_schema_valid_requests_are_served(api, op, data):
    base, session = api
    case = data.draw(op.as_strategy(generation_mode=GenerationMode.POSITIVE))
    status, payload, content_type = await send(session, base, case)
    assert status == 200, (status, payload[:300], case.body, case.headers)
    if content_type == "text/event-stream":
        assert payload.rstrip().endswith(b"data: [DONE]")
    else:
        assert json.loads(payload)["choices"]


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.path)
@RUN
@given(data=st.data())
async def test_schema_invalid_requests_never_get_a_5xx(api, op, data):
    base, session = api
    case = data.draw(op.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    try:
        status, payload, _ = await send(session, base, case)
    except ValueError:  # a header value no HTTP client can send (aiohttp refuses it)
        assume(False)
    assert status < 500, (status, payload[:300], case.body, case.headers)
    if status >= 400:
        assert_error_shape(payload)
