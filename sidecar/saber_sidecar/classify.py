"""Which SLA a request gets, and what the policy needs to know of its body. Pure; no I/O.

Class resolution, first match wins: header `x-saber-sla-class`; then a model-name alias; then
the default class. Header `x-saber-deadline-ms` sets an explicit end-to-end deadline on top of
whichever class was chosen; TTFT and TPOT targets come from the headers the ecosystem's tools
send (`SLO_HEADERS`: saber's own, then llm-d's, then inference-perf's; the first one present wins).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saber_sidecar.config import SidecarConfig, SLAClass

CLASS_HEADER = "x-saber-sla-class"
DEADLINE_HEADER = "x-saber-deadline-ms"
# Per-request time-to-first-token and time-per-output-token targets, in milliseconds, by the name
# each tool uses, in order of precedence when a request carries several.
TTFT_HEADERS = ("x-saber-ttft-ms", "x-llm-d-slo-ttft-ms", "x-slo-ttft-ms")
TPOT_HEADERS = ("x-saber-tpot-ms", "x-llm-d-slo-tpot-ms", "x-slo-tpot-ms")
SLO_HEADERS = (DEADLINE_HEADER, *TTFT_HEADERS, *TPOT_HEADERS)
# A target under a millisecond is no SLO an engine can be held to (and a deadline equal to the
# arrival time, as 1e-300 ms rounds to, is no deadline at all).
MIN_SLO_MS = 1.0
MAX_DEADLINE_MS = 3_600_000
CHARS_PER_TOKEN = 4  # rough prompt-size estimate; the policy uses it only as a hint


class RequestError(ValueError):
    """The request cannot be classified or read; the message says what to change."""

    def __init__(self, message: str, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Classified:
    sla_class: SLAClass
    deadline_s: float | None  # explicit deadline from the header, seconds after arrival
    alias: bool  # the model name was a class alias (the proxy rewrites it to the engine's model)
    ttft_s: float | None = None  # TTFT target from a header, seconds after arrival
    tpot_s: float | None = None  # TPOT target from a header, seconds per output token after the first


@dataclass(frozen=True, slots=True)
class BodyInfo:
    model: str | None
    stream: bool
    max_tokens: int | None
    prompt_tokens: int
    include_usage: bool


def classify(config: SidecarConfig, headers: Mapping[str, str], model: str | None) -> Classified:
    deadline_s = _millis(DEADLINE_HEADER, headers.get(DEADLINE_HEADER))
    ttft_s = _first_millis(headers, TTFT_HEADERS)
    tpot_s = _first_millis(headers, TPOT_HEADERS)
    name = headers.get(CLASS_HEADER)
    if name is not None:
        name = name.strip()
        cls = config.get_class(name)
        if cls is None:
            valid = ", ".join(c.name for c in config.classes)
            raise RequestError(
                f"unknown SLA class {name[:64]!r} in header {CLASS_HEADER}; valid classes: {valid}",
                code="unknown_sla_class",
            )
        alias = model is not None and config.class_for_model(model) is not None
        return Classified(cls, deadline_s, alias, ttft_s, tpot_s)
    if model is not None:
        cls = config.class_for_model(model)
        if cls is not None:
            return Classified(cls, deadline_s, True, ttft_s, tpot_s)
    cls = config.get_class(config.default_class)
    assert cls is not None  # the config validator guarantees it
    return Classified(cls, deadline_s, False, ttft_s, tpot_s)


def _first_millis(headers: Mapping[str, str], names: tuple[str, ...]) -> float | None:
    for name in names:
        raw = headers.get(name)
        if raw is not None:
            return _millis(name, raw)
    return None


def _millis(name: str, raw: str | None) -> float | None:
    """Seconds from a header holding milliseconds in [MIN_SLO_MS, MAX_DEADLINE_MS]."""
    if raw is None:
        return None
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not MIN_SLO_MS <= ms <= MAX_DEADLINE_MS:  # also refuses NaN and infinities
        code = "invalid_deadline" if name == DEADLINE_HEADER else "invalid_slo"
        raise RequestError(
            f"header {name} must be a number of milliseconds in [{MIN_SLO_MS:g}, {MAX_DEADLINE_MS}], "
            f"got {raw[:32]!r}",
            code=code,
        )
    return ms / 1000.0


def body_info(body: Any, chat: bool) -> BodyInfo:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("'model' must be a string")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false")
    max_tokens = body.get("max_tokens")
    if max_tokens is None and chat:
        max_tokens = body.get("max_completion_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError("'max_tokens' must be a positive integer")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return BodyInfo(model, stream, max_tokens, _prompt_tokens(body, chat), include_usage)


def _prompt_tokens(body: dict[str, Any], chat: bool) -> int:
    chars = 0
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise RequestError("'messages' must be a list of {role, content} objects")
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    if not isinstance(part, dict):
                        raise RequestError(f"messages[{i}].content[{j}] must be an object such as "
                                           '{"type": "text", "text": "..."}')
                    text = part.get("text", "")
                    if not isinstance(text, str):
                        raise RequestError(f"messages[{i}].content[{j}].text must be a string")
                    chars += len(text)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            chars = len(prompt)
        elif isinstance(prompt, list):
            # token-id lists count one per id; lists of strings by characters
            chars = sum(len(p) if isinstance(p, str) else CHARS_PER_TOKEN for p in prompt)
    return chars // CHARS_PER_TOKEN
