import pytest

from saber_sidecar.classify import RequestError, body_info, classify
from saber_sidecar.config import parse_config

CONFIG = parse_config(
    """
classes:
  - name: interactive
    deadline_seconds: 1.5
    model_aliases: [coder-fast]
  - name: batch
    deadline_seconds: 30
default_class: batch
"""
)


def test_header_class_wins_over_alias_and_default():
    c = classify(CONFIG, {"x-saber-sla-class": "batch"}, "coder-fast")
    assert c.sla_class.name == "batch" and c.deadline_s is None and c.alias


def test_alias_then_default():
    assert classify(CONFIG, {}, "coder-fast").sla_class.name == "interactive"
    c = classify(CONFIG, {}, "real-model")
    assert c.sla_class.name == "batch" and not c.alias


def test_explicit_deadline_header():
    c = classify(CONFIG, {"x-saber-deadline-ms": "250"}, None)
    assert c.sla_class.name == "batch" and c.deadline_s == pytest.approx(0.25)


@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", "99999999999", "1e-300", "0.5", "inf", "-inf"])
def test_bad_deadline_header(value):
    with pytest.raises(RequestError, match="x-saber-deadline-ms"):
        classify(CONFIG, {"x-saber-deadline-ms": value}, None)


@pytest.mark.parametrize(("headers", "ttft", "tpot"), [
    ({"x-llm-d-slo-ttft-ms": "200", "x-llm-d-slo-tpot-ms": "50"}, 0.2, 0.05),   # llm-d
    ({"x-slo-ttft-ms": "300", "x-slo-tpot-ms": "40"}, 0.3, 0.04),               # inference-perf
    ({"x-saber-ttft-ms": "100", "x-saber-tpot-ms": "20"}, 0.1, 0.02),           # saber's own
    # Several for one target: saber's, then llm-d's, then inference-perf's.
    ({"x-slo-ttft-ms": "300", "x-llm-d-slo-ttft-ms": "200", "x-saber-ttft-ms": "100"}, 0.1, None),
    ({"x-slo-tpot-ms": "40", "x-llm-d-slo-tpot-ms": "50"}, None, 0.05),
    ({}, None, None),
])
def test_slo_headers_of_the_ecosystem(headers, ttft, tpot):
    c = classify(CONFIG, headers, None)
    assert c.ttft_s == (pytest.approx(ttft) if ttft is not None else None)
    assert c.tpot_s == (pytest.approx(tpot) if tpot is not None else None)


@pytest.mark.parametrize("name", ["x-llm-d-slo-ttft-ms", "x-slo-tpot-ms", "x-saber-ttft-ms"])
@pytest.mark.parametrize("value", ["0", "1e-300", "nan", "fast", "1e309"])
def test_bad_slo_header_names_itself(name, value):
    with pytest.raises(RequestError, match=name) as err:
        classify(CONFIG, {name: value}, None)
    assert err.value.code == "invalid_slo"


def test_unknown_class_lists_valid_ones():
    with pytest.raises(RequestError) as err:
        classify(CONFIG, {"x-saber-sla-class": "gold"}, None)
    assert "interactive, batch" in str(err.value) and err.value.code == "unknown_sla_class"


def test_body_info_completion_and_chat():
    info = body_info({"model": "m", "prompt": "x" * 400, "max_tokens": 7, "stream": True,
                      "stream_options": {"include_usage": True}}, chat=False)
    assert (info.model, info.stream, info.max_tokens, info.prompt_tokens, info.include_usage) == ("m", True, 7, 100, True)
    info = body_info({"messages": [{"role": "user", "content": "y" * 40}], "max_completion_tokens": 3}, chat=True)
    assert (info.max_tokens, info.prompt_tokens, info.stream) == (3, 10, False)


@pytest.mark.parametrize(
    "body, chat, fragment",
    [
        ([1, 2], False, "JSON object"),
        ({"max_tokens": 0}, False, "max_tokens"),
        ({"max_tokens": "9"}, False, "max_tokens"),
        ({"stream": "yes"}, False, "stream"),
        ({"model": 5}, False, "model"),
        ({"messages": "hi"}, True, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}, True,
         r"messages\[0\]\.content\[0\]\.text must be a string"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, True, r"messages\[0\]\.content\[0\] must be an object"),
    ],
)
def test_body_info_rejects(body, chat, fragment):
    with pytest.raises(RequestError, match=fragment):
        body_info(body, chat)


def test_json_depth_counts_nesting_without_recursion():
    from saber_sidecar.proxy import MAX_JSON_DEPTH, json_depth

    assert json_depth("text") == 0
    assert json_depth({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}) == 5
    deep: object = []
    for _ in range(10_000):  # far past any recursion limit: the check itself must not recurse
        deep = [deep]
    assert json_depth(deep) == 10_001 > MAX_JSON_DEPTH
