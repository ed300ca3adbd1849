"""Property tests (hypothesis) of the sidecar's two parsers of other people's bytes.

The engine client (`upstream.py`) against scripted servers that send generated responses, split
at generated points, with bad chunk sizes, oversized heads, or cut short: every response is
either decoded exactly or ends in an `EngineError`, never a hang, never a wrong body.

The sidecar's request handling, against the real emulator (a fast flat profile, so generated
requests that are valid finish at once): generated JSON, wrong types, huge and deeply nested
bodies, bad SLO headers. Never a 5xx, never a hang, and every 4xx carries a reason in the OpenAI
error shape.

Bounded by `max_examples` so each test stays within a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from saber_sidecar.upstream import MAX_HEAD_BYTES, EngineError, EnginePool, Sink
from sidecar_support import MODEL, emulator_url

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class Recorder(Sink):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_data(self, data: bytes) -> None:
        self.data.append(data)

    def on_end(self) -> None:
        if not self.ended.done():
            self.ended.set_result("end")

    def on_error(self, exc: Exception) -> None:
        if not self.ended.done():
            self.ended.set_result(exc)


async def exchange(raw: bytes, cuts: list[int], close_after: bool = True) -> tuple[object, bytes]:
    """Serve `raw` split at `cuts` (each piece its own read) to one POST from a fresh pool;
    returns (outcome, body): outcome "end", or the EngineError raised or reported."""
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)]) if b > a]

    async def script(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)
            if close_after:
                writer.close()
            else:
                await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass

    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = EnginePool(f"http://127.0.0.1:{port}", read_timeout_s=5)
    try:
        async with asyncio.timeout(10):  # never a hang
            try:
                resp = await pool.post("/v1/completions", b"{}", {})
            except EngineError as exc:
                return exc, b""
            sink = Recorder()
            resp.attach(sink)
            outcome = await sink.ended
            resp.close()
            return outcome, b"".join(sink.data)
    finally:
        await pool.close()
        server.close()


def chunked(payloads: list[bytes], size_lines: list[bytes] | None = None) -> bytes:
    out = b""
    for i, p in enumerate(payloads):
        size = size_lines[i] if size_lines is not None else b"%x" % len(p)
        out += size + b"\r\n" + p + b"\r\n"
    return out + b"0\r\n\r\n"


HEAD_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
payloads_st = st.lists(st.binary(min_size=1, max_size=200), min_size=0, max_size=6)


@st.composite
def framed(draw):
    """A valid response in one of the three framings, and its body."""
    payloads = draw(payloads_st)
    body = b"".join(payloads)
    kind = draw(st.sampled_from(["chunked", "length", "close"]))
    if kind == "chunked":
        ext = draw(st.sampled_from([b"", b";x=1", b";name"]))
        raw = HEAD_CHUNKED + chunked(payloads).replace(b"\r\n", ext + b"\r\n", 1) if payloads else HEAD_CHUNKED + b"0\r\n\r\n"
        if draw(st.booleans()):  # trailers after the last chunk
            raw = raw[: -2] + b"X-Trailer: t\r\n\r\n"
    elif kind == "length":
        raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    else:
        raw = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + body
    return kind, raw, body


def cuts_for(raw: bytes):
    return st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=10, unique=True).map(sorted)


@FUZZ
@given(data=st.data())
async def test_any_split_of_a_valid_response_is_decoded_exactly(data):
    kind, raw, body = data.draw(framed())
    cuts = data.draw(cuts_for(raw))
    outcome, got = await exchange(raw, cuts, close_after=(kind == "close"))
    assert outcome == "end", (outcome, kind)
    assert got == body


@FUZZ
@given(payloads=st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4),
       bad=st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b and b";" not in b),
       which=st.integers(0, 3), data=st.data())
async def test_bad_chunk_sizes_are_engine_errors(payloads, bad, which, data):
    which %= len(payloads)
    size_lines = [b"%x" % len(p) for p in payloads]
    size_lines[which] = bad
    raw = HEAD_CHUNKED + chunked(payloads, size_lines)
    outcome, got = await exchange(raw, data.draw(cuts_for(raw)))
    valid = re.fullmatch(rb"[0-9a-fA-F]+", bad) is not None and int(bad, 16) == len(payloads[which])
    if valid:
        assert outcome == "end" and got == b"".join(payloads)
    else:
        assert isinstance(outcome, EngineError), (bad, outcome)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1_000, 3 * MAX_HEAD_BYTES), one_read=st.booleans())
async def test_oversized_heads_are_refused(size, one_read):
    raw = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * size + b"\r\nContent-Length: 2\r\n\r\nok"
    cuts = [] if one_read else list(range(4096, len(raw), 4096))
    outcome, got = await exchange(raw, cuts)
    if size + 16 > MAX_HEAD_BYTES:
        assert isinstance(outcome, EngineError) and "too large" in str(outcome)
    else:
        assert outcome == "end" and got == b"ok"


@FUZZ
@given(data=st.data())
async def test_a_response_cut_short_is_an_error_never_an_end(data):
    kind, raw, body = data.draw(framed().filter(lambda f: f[0] != "close"))
    cut = data.draw(st.integers(0, len(raw) - 1))
    outcome, got = await exchange(raw[:cut], data.draw(cuts_for(raw[:cut])))
    assert isinstance(outcome, EngineError), (kind, cut, len(raw), outcome)
    assert body.startswith(got)  # whatever was relayed is a prefix of the real body


# -- the sidecar's request handling -------------------------------------------------------------

FAST = {"max_model_len": 256}


@pytest.fixture
async def fuzz_sidecar(start_emulator, start_sidecar, tmp_path):
    profile = tmp_path / "flat.json"
    profile.write_text(json.dumps({"name": "flat-0.2ms", "description": "fast flat step for fuzzing",
                                   "decode_batch_sizes": [1], "decode_step_s": [0.0002],
                                   "prefill_s_per_token": 0.0, "context_s_per_token": 0.0,
                                   "prefill_only_step_s": None}))
    from saber_emulator.server import EmulatorServer
    from sidecar_support import emulator_settings

    settings_ = emulator_settings(**FAST).model_copy(update={"profile": str(profile)})
    engine = EmulatorServer(settings_)
    await engine.start()
    sidecar = await start_sidecar(emulator_url(engine), max_body_bytes=64 * 1024)
    async with aiohttp.ClientSession() as session:
        yield sidecar, session
    await engine.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_values = json_values | st.integers(-5, 40)


@st.composite
def request_bodies(draw):
    """Mostly OpenAI-shaped bodies with fields of any type, sometimes anything at all."""
    shape = draw(st.sampled_from(["fields", "json", "bytes", "nested", "huge"]))
    if shape == "json":
        return json.dumps(draw(json_values)).encode()
    if shape == "bytes":
        return draw(st.binary(max_size=300))
    if shape == "nested":
        depth = draw(st.integers(1, 5000))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        inner = opener * depth + b"1" + closer * depth
        return b'{"model": "m", "prompt": "p", "max_tokens": 2, "x": ' + inner + b"}"
    if shape == "huge":
        return json.dumps({"model": MODEL, "prompt": "x" * draw(st.integers(60_000, 70_000)),
                           "max_tokens": 1}).encode()
    body = {}
    for name in draw(st.sets(st.sampled_from(["model", "prompt", "messages", "max_tokens", "max_completion_tokens",
                                              "stream", "stream_options", "priority", "n", "temperature"]))):
        body[name] = draw(field_values)
    if draw(st.booleans()):
        body["model"] = MODEL
    return json.dumps(body).encode()


header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=24)
slo_headers = st.dictionaries(
    st.sampled_from(["x-saber-sla-class", "x-saber-deadline-ms", "x-saber-ttft-ms", "x-saber-tpot-ms",
                     "x-llm-d-slo-ttft-ms", "x-llm-d-slo-tpot-ms", "x-slo-ttft-ms", "x-slo-tpot-ms"]),
    header_values | st.sampled_from(["1e-300", "nan", "inf", "-1", "0", "1e309", "5", "60000", "batch"]),
    max_size=3,
)


async def check_answer(session, url: str, body: bytes, headers: dict[str, str]) -> int:
    async with asyncio.timeout(20):  # never a hang
        async with session.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r:
            payload = await r.read()
            assert r.status < 500, (r.status, payload[:300], body[:200], headers)
            if r.status >= 400:
                error = json.loads(payload)["error"]
                assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]
                assert "type" in error and "code" in error
            return r.status


@FUZZ
@given(body=request_bodies(), chat=st.booleans(), headers=slo_headers)
async def test_no_request_body_or_slo_header_gets_a_5xx(fuzz_sidecar, body, chat, headers):
    sidecar, session = fuzz_sidecar
    path = "/v1/chat/completions" if chat else "/v1/completions"
    await check_answer(session, sidecar.url + path, body, headers)


async def test_sidecar_survives_the_fuzzing_and_counted_every_request(fuzz_sidecar):
    """After a burst of malformed requests the sidecar still serves, and holds nothing for them."""
    sidecar, session = fuzz_sidecar
    bodies = [b"{", b"[]", b'{"prompt": 1}', b'{"max_tokens": "3"}', b"\xff\xfe", b'{"stream": "yes"}']
    for body in bodies:
        assert await check_answer(session, sidecar.url + "/v1/completions", body, {}) == 400
    ok = json.dumps({"model": MODEL, "prompt": "p", "max_tokens": 2}).encode()
    assert await check_answer(session, sidecar.url + "/v1/completions", ok, {}) == 200
    assert sidecar.sidecar.gate.stats().running == 0 and not sidecar.sidecar.pool._busy
