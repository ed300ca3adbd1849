"""vLLM's OpenAI-compatible wire format: request validation, response bodies, SSE chunks, errors.

No aiohttp here: functions take decoded JSON and return dicts or strings, so they are unit-tested
without a server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

DEFAULT_CHARS_PER_TOKEN = 4.0
# Chat template overhead when no tokenizer is given: role header and separators per message,
# plus the assistant header that opens the reply (close to ChatML's count).
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_TOKENS_REPLY = 3

# Emitted text: a fixed cycle of code-like pieces, one per generated token (pre-escaped for JSON).
TOKEN_PIECES = ("def", " emulate", "(", "batch", "):", "\n", "    ", "return", " batch", " *", " 2", "\n")
TOKEN_JSON = tuple(json.dumps(p)[1:-1] for p in TOKEN_PIECES)


def token_text(start: int, count: int) -> str:
    return "".join(TOKEN_PIECES[(start + k) % len(TOKEN_PIECES)] for k in range(count))


class ProtocolError(Exception):
    """A request the server refuses; rendered as vLLM's error JSON."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.err_type, self.status, self.param)


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


class TokenCounter:
    """Prompt length: a real tokenizer (tokenizer.json via `tokenizers`) when given, else chars / ratio."""

    def __init__(self, tokenizer_path: str | None = None, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> None:
        if chars_per_token <= 0:
            raise ValueError("chars_per_token must be > 0")
        self.chars_per_token = chars_per_token
        self._tok = None
        if tokenizer_path:
            from tokenizers import Tokenizer

            p = Path(tokenizer_path)
            if p.is_dir():
                p = p / "tokenizer.json"
            if not p.exists():
                raise FileNotFoundError(f"tokenizer file {p} not found (pass a tokenizer.json or a folder holding one)")
            self._tok = Tokenizer.from_file(str(p))

    @property
    def exact(self) -> bool:
        return self._tok is not None

    def count(self, text: str) -> int:
        if self._tok is not None:
            return len(self._tok.encode(text, add_special_tokens=False).ids)
        return math.ceil(len(text) / self.chars_per_token)

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        total = CHAT_TOKENS_REPLY
        for m in messages:
            total += CHAT_TOKENS_PER_MESSAGE + self.count(m["role"]) + self.count(_content_text(m.get("content")))
        return total


@dataclass(slots=True)
class ParsedRequest:
    kind: Literal["completion", "chat"]
    model: str
    prompt_tokens: int
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    priority: int = 0
    stop: list[str] = field(default_factory=list)
    # Benchmark-only: `vllm_xargs.saber_output_tokens`, the length to stop at (capped by max_tokens);
    # the same argument the benchmark's vLLM logits processor reads. An admission gate never sees it.
    stop_at_tokens: int | None = None


@dataclass(slots=True)
class ProtocolContext:
    served_model_names: list[str]
    max_model_len: int
    counter: TokenCounter


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or not isinstance(p.get("type"), str):
                raise ProtocolError("each content part must be an object with a 'type'", param="messages")
            if p["type"] == "text":
                if not isinstance(p.get("text"), str):
                    raise ProtocolError("a text content part needs a string 'text'", param="messages")
                parts.append(p["text"])
            else:
                raise ProtocolError(f"content part type {p['type']!r} is not supported by this text model", param="messages")
        return "".join(parts)
    raise ProtocolError("message 'content' must be a string, a list of parts or null", param="messages")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise ProtocolError(f"'{key}' must be an integer, got {v!r}", param=key)
    return v


def _opt_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ProtocolError(f"'{key}' must be a boolean, got {v!r}", param=key)
    return v


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("the request body must be a JSON object")
    return body


def _common(body: dict[str, Any], ctx: ProtocolContext, kind: str, prompt_tokens: int) -> ParsedRequest:
    model = body.get("model")
    if model is None:
        model = ctx.served_model_names[0]
    elif not isinstance(model, str) or model not in ctx.served_model_names:
        raise ProtocolError(f"The model `{model}` does not exist.", status=404, err_type="NotFoundError", param="model")

    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise ProtocolError("the emulator serves n=1 only (one choice per request)", param="n")
    for key in ("best_of", "use_beam_search"):
        if body.get(key) not in (None, 1, False):
            raise ProtocolError(f"'{key}' is not supported by the emulator", param=key)

    stream = _opt_bool(body, "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise ProtocolError("Stream options can only be defined when `stream=True`.", param="stream_options")
        if not isinstance(opts, dict):
            raise ProtocolError("'stream_options' must be an object", param="stream_options")
        include_usage = bool(opts.get("include_usage", False))

    stop = body.get("stop")
    if stop is None:
        stop_list: list[str] = []
    elif isinstance(stop, str):
        stop_list = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop_list = list(stop)
    else:
        raise ProtocolError("'stop' must be a string or a list of strings", param="stop")

    if prompt_tokens >= ctx.max_model_len:
        raise ProtocolError(
            f"This model's maximum context length is {ctx.max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
            param="messages" if kind == "chat" else "prompt",
        )

    max_key = "max_tokens"
    max_tokens = _opt_int(body, "max_tokens")
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_key = "max_completion_tokens"
        max_tokens = _opt_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = ctx.max_model_len - prompt_tokens
    elif max_tokens < 1:
        raise ProtocolError(f"{max_key} must be at least 1, got {max_tokens}.", param=max_key)
    if prompt_tokens + max_tokens > ctx.max_model_len:
        raise ProtocolError(
            f"This model's maximum context length is {ctx.max_model_len} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param=max_key,
        )

    min_tokens = _opt_int(body, "min_tokens") or 0
    if min_tokens < 0 or min_tokens > max_tokens:
        raise ProtocolError(f"min_tokens must be in [0, max_tokens={max_tokens}], got {min_tokens}", param="min_tokens")

    # Accepted and ignored under fcfs, as vLLM 0.32 does (measured in docs/VLLM_CPU.md).
    priority = _opt_int(body, "priority") or 0
    stop_at = _stop_at(body)

    return ParsedRequest(
        kind=kind,  # type: ignore[arg-type]
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        ignore_eos=_opt_bool(body, "ignore_eos"),
        min_tokens=min_tokens,
        priority=priority,
        stop=stop_list,
        stop_at_tokens=min(stop_at, max_tokens) if stop_at is not None else None,
    )


STOP_AT_XARG = "saber_output_tokens"


def _stop_at(body: dict[str, Any]) -> int | None:
    """`vllm_xargs` is vLLM's per-request extra-arguments object; only our key is read from it."""
    xargs = body.get("vllm_xargs")
    if xargs is None:
        return None
    if not isinstance(xargs, dict):
        raise ProtocolError("'vllm_xargs' must be an object", param="vllm_xargs")
    v = xargs.get(STOP_AT_XARG)
    if v is None:
        return None
    if not _is_int(v) or v < 1:
        raise ProtocolError(f"vllm_xargs.{STOP_AT_XARG} must be an integer >= 1, got {v!r}", param="vllm_xargs")
    return v


def parse_completion(body: dict[str, Any], ctx: ProtocolContext) -> ParsedRequest:
    prompt = body.get("prompt")
    if prompt is None:
        raise ProtocolError("'prompt' is required", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ProtocolError("'prompt' must not be empty", param="prompt")
        count = ctx.counter.count(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        count = len(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ProtocolError("the emulator takes one prompt per request; send batched prompts as separate requests", param="prompt")
    else:
        raise ProtocolError("'prompt' must be a non-empty string or a list of token ids", param="prompt")
    return _common(body, ctx, "completion", max(1, count))


def parse_chat(body: dict[str, Any], ctx: ProtocolContext) -> ParsedRequest:
    messages = body.get("messages")
    if messages is None:
        raise ProtocolError("'messages' is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ProtocolError("'messages' must be a non-empty list", param="messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ProtocolError("each message must be an object with a string 'role'", param="messages")
    return _common(body, ctx, "chat", ctx.counter.count_chat(messages))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish: str, pt: int, ct: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                     "prompt_logprobs": None}],
        "usage": usage(pt, ct),
    }


def chat_body(rid: str, created: int, model: str, text: str, finish: str, pt: int, ct: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "tool_calls": []},
                     "logprobs": None, "finish_reason": finish, "stop_reason": None}],
        "usage": usage(pt, ct),
    }


class ChunkWriter:
    """Builds a stream's SSE lines from string templates: no json.dumps per token on the hot path."""

    def __init__(self, kind: str, rid: str, created: int, model: str) -> None:
        self.kind = kind
        self.head = json.dumps({"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion.chunk",
                                "created": created, "model": model})[:-1]
        self.sent = 0
        if kind == "completion":
            self._open = 'data: ' + self.head + ',"choices":[{"index":0,"text":"'
            self._close = '","logprobs":null,"finish_reason":%s,"stop_reason":null}]}\n\n'
        else:
            self._open = 'data: ' + self.head + ',"choices":[{"index":0,"delta":{"content":"'
            self._close = '"},"logprobs":null,"finish_reason":%s}]}\n\n'
        self._close_null = self._close % "null"

    def role_chunk(self) -> str:
        """Chat streams open with the assistant role, as vLLM's do."""
        return ('data: ' + self.head + ',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
                '"logprobs":null,"finish_reason":null}]}\n\n')

    def tokens(self, count: int, finish: str | None = None) -> str:
        """`count` token chunks; the last carries `finish` when given."""
        parts = []
        pieces = TOKEN_JSON
        n = len(pieces)
        for k in range(count):
            close = self._close_null if (finish is None or k < count - 1) else self._close % json.dumps(finish)
            parts.append(self._open + pieces[(self.sent + k) % n] + close)
        self.sent += count
        return "".join(parts)

    def finish_chunk(self, finish: str) -> str:
        """An empty chunk carrying the finish reason (used when no token remains to carry it)."""
        return self._open + self._close % json.dumps(finish)

    def usage_chunk(self, pt: int, ct: int) -> str:
        return 'data: ' + self.head + ',"choices":[],"usage":' + json.dumps(usage(pt, ct)) + '}\n\n'

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"


