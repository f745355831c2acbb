"""Request validation of the OpenAI-compatible API: accepted shapes, OpenAI's ranges, 400s naming the parameter."""

from __future__ import annotations

import pytest

from corolla.api.errors import ApiError
from corolla.api.schemas import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    check_model,
    parse_chat_request,
    parse_completion_request,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _chat(**fields):
    return parse_chat_request({**CHAT, **fields})


def _error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


def test_chat_defaults_are_openais():
    req = _chat()
    p = req.params
    assert req.model == "m" and req.messages == [{"role": "user", "content": "hi"}]
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (None, 1.0, 1.0, 1, (), None)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs, p.top_logprobs) == (0.0, 0.0, False, 0)
    assert not p.stream and not p.include_usage and not p.greedy


def test_chat_options_parsed():
    p = _chat(
        max_completion_tokens=7, max_tokens=99, temperature=0, top_p=0.5, n=3, stop="END", seed=4,
        presence_penalty=-1.5, frequency_penalty=2, logprobs=True, top_logprobs=5, stream=True,
        stream_options={"include_usage": True}, logit_bias={"12": -100}, user="someone",
    ).params  # fmt: skip
    assert p.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
    assert p.greedy and p.top_p == 0.5 and p.n == 3 and p.stop == ("END",) and p.seed == 4
    assert (p.presence_penalty, p.frequency_penalty) == (-1.5, 2.0)
    assert p.logprobs and p.top_logprobs == 5 and p.stream and p.include_usage
    assert p.logit_bias == {12: -100.0}


def test_message_content_parts_and_roles():
    req = _chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ]
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.1}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"presence_penalty": -2.1}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"model": None}, "model"),
    ],
)
def test_chat_invalid_parameters_are_400_naming_the_parameter(fields, param):
    error = _error(parse_chat_request, {**CHAT, **fields})
    assert error.status == 400 and error.param == param and error.type == "invalid_request_error"
    assert error.body()["error"]["param"] == param and error.body()["error"]["message"]


def test_body_must_be_an_object():
    error = _error(parse_chat_request, [1, 2])
    assert error.status == 400


def test_completion_prompts():
    assert parse_completion_request({"model": "m", "prompt": "x"}).prompt == "x"
    assert parse_completion_request({"model": "m", "prompt": ["x"]}).prompt == "x"
    assert parse_completion_request({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_completion_request({"model": "m", "prompt": [[1, 2]]}).prompt == [1, 2]
    req = parse_completion_request({"model": "m", "prompt": "x", "logprobs": 2})
    assert req.params.max_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS
    assert req.params.logprobs and req.params.top_logprobs == 2
    assert not parse_completion_request({"model": "m", "prompt": "x", "logprobs": 0}).params.top_logprobs


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ],
)
def test_completion_invalid_parameters(fields, param):
    error = _error(parse_completion_request, {"model": "m", **fields})
    assert error.status == 400 and error.param == param


def test_unknown_model_is_404():
    check_model("a", ("a", "b"))
    error = _error(check_model, "c", ("a", "b"))
    assert error.status == 404 and error.code == "model_not_found" and "`c`" in error.message
