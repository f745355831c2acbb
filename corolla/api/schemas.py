"""Request validation: OpenAI request bodies (already parsed JSON) -> typed, checked requests. Pure.

Checks follow OpenAI's documented ranges; a bad value is a 400 naming the parameter. Fields this
API does not implement (tools, JSON mode, ``best_of``, ``echo``, ``suffix``) are refused rather than
silently ignored, so a client never gets an answer to a different question than it asked. Unknown
extra fields (``user``, ``metadata``, vendor options) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from corolla.api.errors import ApiError, invalid

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20  # chat; completions allow 5, as OpenAI
MAX_COMPLETION_LOGPROBS = 5
#: OpenAI's default max_tokens for /v1/completions; chat defaults to the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

_UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "suffix": "suffix", "audio": "audio output",
    "prediction": "predicted outputs",
}  # fmt: skip
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation, in OpenAI's terms (temperature 0 means greedy)."""

    max_tokens: int | None = None  # None: the rest of the context (chat) / 16 (completions), see resolve
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # role/content, content flattened to text
    params: SamplingParams


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]
    params: SamplingParams


def parse_chat_request(body: Any) -> ChatRequest:
    body = _object(body)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of messages", "messages")
    parsed = [_message(m, i) for i, m in enumerate(messages)]
    logprobs = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    max_tokens = _int(body, "max_completion_tokens", None, 1, None)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1, None)
    format_ = body.get("response_format")
    if format_ is not None and not (isinstance(format_, dict) and format_.get("type") == "text"):
        raise invalid("only response_format {'type': 'text'} is supported", "response_format", "unsupported_value")
    return ChatRequest(model, parsed, _sampling(body, max_tokens, logprobs, top))


def parse_completion_request(body: Any) -> CompletionRequest:
    body = _object(body)
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise invalid(
                "'prompt' must be a string, or one list of token ids; several prompts per request are not "
                "supported (send them as separate requests, which run concurrently)",
                "prompt",
            )
    elif not isinstance(prompt, str):
        raise invalid("'prompt' must be a string or a list of token ids", "prompt")
    if body.get("echo") is True:
        raise invalid("'echo' is not supported", "echo", "unsupported_parameter")
    best_of = body.get("best_of")
    if best_of not in (None, 1) and best_of != body.get("n", 1):
        raise invalid("'best_of' other than n is not supported", "best_of", "unsupported_parameter")
    top = _int(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    max_tokens = _int(body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS, 1, None)
    return CompletionRequest(model, prompt, _sampling(body, max_tokens, top is not None, top or 0))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None, "invalid_request")
    for name, what in _UNSUPPORTED.items():
        if body.get(name) not in (None, [], {}):
            raise invalid(f"'{name}' ({what}) is not supported by this server", name, "unsupported_parameter")
    return body


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: a model id from GET /v1/models", "model", "missing_required_parameter")
    return model


def _message(message: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise invalid(f"{param} must be an object with 'role' and 'content'", param)
    role = message.get("role")
    if role not in _ROLES:
        raise invalid(f"{param}.role must be one of {', '.join(_ROLES)}, got {role!r}", f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(f"{param}.content: only text parts are supported", f"{param}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise invalid(f"{param}.content must be a string or an array of text parts", f"{param}.content")
    return {"role": _ROLES[role], "content": content}


def _sampling(body: dict, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False, "stream_options.include_usage")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, 0.0, 1.0),
        n=_int(body, "n", 1, 1, MAX_N),
        stop=_stop(body.get("stop")),
        seed=_int(body, "seed", None, None, None),
        presence_penalty=_float(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_float(body, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body.get("logit_bias")),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        stream=stream,
        include_usage=include_usage,
    )


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"'stop' takes at most {MAX_STOP} sequences", "stop")
    if any(not s for s in stops):
        raise invalid("'stop' sequences must not be empty", "stop")
    return tuple(dict.fromkeys(stops))


def _logit_bias(value: Any) -> dict[int, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("'logit_bias' must map token ids to biases", "logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise invalid(f"'logit_bias' key {key!r} is not a token id", "logit_bias") from None
        if token < 0 or not _number(bias) or not -100 <= bias <= 100:
            raise invalid(f"'logit_bias' for token {key}: a number in [-100, 100] is required", "logit_bias")
        out[token] = float(bias)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _float(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _number(value) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number between {low:g} and {high:g}, got {value!r}", name)
    return float(value)


def _int(body: dict, name: str, default, low: int | None, high: int | None, param: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"'{name}' must be an integer, got {value!r}", param or name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise invalid(f"'{name}' must be {bounds}, got {value}", param or name)
    return value


def _bool(body: dict, name: str, default: bool, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {value!r}", param or name)
    return value


def check_model(requested: str, served: tuple[str, ...]) -> None:
    """404 unless ``requested`` is one of the names this server answers to."""
    if requested not in served:
        raise ApiError(
            404,
            f"The model `{requested}` does not exist or is not served here; available: {', '.join(served[:1])}",
            param="model",
            code="model_not_found",
        )
