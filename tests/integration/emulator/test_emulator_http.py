"""The emulator as a real process on loopback, driven by the `openai` client and raw HTTP."""

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "test-model"
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="module")
def base_url():
    proc = subprocess.Popen(
        [sys.executable, "-m", "saber_cli.main", "emulator", "--port", "0", "--served-model-name", MODEL,
         "--max-model-len", str(MAX_MODEL_LEN), "--num-gpu-blocks", "256", "--seed", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert m, f"emulator did not start: {line!r} {proc.stdout.read() if proc.poll() is not None else ''}"
        yield m.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metrics(base_url: str) -> dict:
    _, text = get(base_url + "/metrics")
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def value(fams: dict, family: str, sample: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(sample)


def test_completion_non_streaming_has_usage(client):
    r = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=12, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == 4  # 14 characters at the documented 4 characters per token
    assert r.usage.total_tokens == 16


def test_completion_streaming_with_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL, prompt="x" * 40, max_tokens=9, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) == 9
    assert all(c.object == "text_completion" for c in chunks)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 9 and chunks[-1].usage.prompt_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_chat_non_streaming_and_streaming(client):
    messages = [{"role": "system", "content": "You write code."}, {"role": "user", "content": "Sort a list."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 6 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens and chunks[-1].usage.completion_tokens == 6


def test_output_length_is_drawn_and_capped_without_ignore_eos(client):
    lengths = {client.completions.create(model=MODEL, prompt="p", max_tokens=40).usage.completion_tokens for _ in range(6)}
    assert all(20 <= n <= 40 for n in lengths) and len(lengths) > 1
    r = client.completions.create(model=MODEL, prompt="p", max_tokens=40, extra_body={"min_tokens": 40})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


def test_models_health_version(base_url, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert get(base_url + "/health")[0] == 200
    status, body = get(base_url + "/version")
    assert status == 200 and "version" in json.loads(body)


def test_metrics_names_types_labels_and_counters_move(base_url, client):
    before = metrics(base_url)
    expected_types = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
        "vllm:iteration_tokens_total": "histogram",
    }
    for name, kind in expected_types.items():
        assert before[name].type == kind, name
        for s in before[name].samples:
            assert s.labels["model_name"] == MODEL and s.labels["engine"] == "0"
    assert {s.labels["finished_reason"] for s in before["vllm:request_success"].samples} == {"stop", "length", "abort"}
    ttft_bounds = [s.labels["le"] for s in before["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert ttft_bounds[0] == "0.001" and ttft_bounds[-1] == "+Inf" and len(ttft_bounds) == 23

    r = client.completions.create(model=MODEL, prompt="abcd" * 5, max_tokens=7, extra_body={"ignore_eos": True})
    after = metrics(base_url)
    delta = lambda fam, sample, **kw: value(after, fam, sample, **kw) - value(before, fam, sample, **kw)  # noqa: E731
    assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == 7
    assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == r.usage.prompt_tokens == 5
    assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
    assert value(after, "vllm:num_requests_running", "vllm:num_requests_running") == 0


@pytest.mark.parametrize("path,body,status,err_type,fragment", [
    ("/v1/completions", b"{not json", 400, "BadRequestError", "malformed JSON"),
    ("/v1/completions", b"[1, 2]", 400, "BadRequestError", "JSON object"),
    ("/v1/completions", {"model": MODEL, "max_tokens": 5}, 400, "BadRequestError", "'prompt' is required"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "BadRequestError", "'messages' is required"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "BadRequestError", "non-empty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "BadRequestError", "at least 1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -3},
     400, "BadRequestError", "at least 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * 400, "max_tokens": 1000}, 400, "BadRequestError",
     "maximum context length is 1024"),
    ("/v1/completions", {"model": MODEL, "prompt": list(range(1024)), "max_tokens": 1}, 400, "BadRequestError",
     "1024 input tokens"),
    ("/v1/completions", {"model": "gpt-7", "prompt": "x", "max_tokens": 5}, 404, "NotFoundError", "`gpt-7` does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "BadRequestError", "n=1"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "BadRequestError", "stream=True"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "priority": "high"}, 400, "BadRequestError", "integer"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "BadRequestError", "integer"),
])
def test_bad_input_gets_vllm_style_errors(base_url, path, body, status, err_type, fragment):
    got_status, got = post(base_url + path, body)
    assert got_status == status
    err = got["error"]
    assert err["type"] == err_type and err["code"] == status and fragment in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_priority_is_accepted_and_ignored_under_fcfs_as_vllm_does(base_url):
    status, got = post(base_url + "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "priority": 3})
    assert status == 200 and got["usage"]["completion_tokens"] >= 1


def test_openai_client_sees_errors_as_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y" * 5000}], max_tokens=10)
