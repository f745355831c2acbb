"""OpenAI response objects for chat and text completions, streamed (chunks) or whole. Pure formatting.

corolla adds one field OpenAI clients ignore (their models keep unknown fields): ``corolla``, with
the route (the servers the answer went through, blocks [start, end) each), on the first chunk as
opened and on the last one as it ended (after any failover), plus the failover count, the time to
first token and the generation speed.
"""

from __future__ import annotations

import json
import time
import uuid

from corolla.api.engine import Delta, Done, Step
from corolla.api.schemas import SamplingParams


def corolla_extras(done: Done) -> dict:
    return {
        "route": done.route,
        "failovers": done.failovers,
        "time_to_first_token": round(done.time_to_first_token, 4),
        "tokens_per_second": round(done.tokens_per_second, 2),
        "seconds": round(done.seconds, 4),
    }


def usage(done: Done) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n".encode()


class Formatter:
    """Builds one request's response objects. ``chat`` picks chat.completion vs text_completion."""

    def __init__(self, chat: bool, model: str, params: SamplingParams):
        self.chat, self.model, self.params = chat, model, params
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._offsets = [0] * params.n  # completions' text_offset per choice
        self._route: list[dict] | None = None

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if chunk and self.params.include_usage:
            out["usage"] = None
        return out

    # -- streaming -----------------------------------------------------------------------------------

    def first_chunks(self, route: list[dict] | None) -> list[dict]:
        """Chat streams open with the assistant role for each choice (and the route, once known)."""
        self._route = route
        if not self.chat:
            return []
        choices = [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(self.params.n)
        ]
        return [self._with_route(self._envelope(choices, chunk=True))]

    def step_chunk(self, step: Step) -> dict | None:
        """A chunk with every choice's new text; None when no choice has anything new (held-back text)."""
        self._route = self._route or step.route
        if not step.deltas:
            return None
        return self._with_route(self._envelope([self._stream_choice(d) for d in step.deltas], chunk=True))

    def _with_route(self, chunk: dict) -> dict:
        """The first chunk that has choices carries the route the session opened."""
        if self._route:
            chunk["corolla"] = {"route": self._route}
            self._route = None
        return chunk

    def _stream_choice(self, delta: Delta) -> dict:
        if self.chat:
            return {
                "index": delta.index,
                "delta": {"content": delta.text} if delta.text else {},
                "logprobs": self._chat_logprobs(delta.logprobs),
                "finish_reason": delta.finish_reason,
            }
        return {
            "index": delta.index,
            "text": delta.text,
            "logprobs": self._completion_logprobs(delta.index, delta.logprobs, delta.text),
            "finish_reason": delta.finish_reason,
        }

    def finish(self, last: dict | None, done: Done) -> list[dict]:
        """The stream's end: usage (if asked) and the corolla extras go on the usage chunk, else on ``last``
        (the final chunk with choices, held back until now for this)."""
        if self.params.include_usage:
            chunk = self._envelope([], chunk=True)
            chunk["usage"] = usage(done)
            chunk["corolla"] = corolla_extras(done)
            return [last, chunk] if last is not None else [chunk]
        if last is None:
            last = self._envelope([], chunk=True)
        last["corolla"] = {**last.get("corolla", {}), **corolla_extras(done)}
        return [last]

    # -- whole responses -----------------------------------------------------------------------------

    def complete(self, deltas: list[Delta], done: Done) -> dict:
        """A non-streamed response from every delta of the request, in order."""
        merged = [Delta(i) for i in range(self.params.n)]
        for d in deltas:
            merged[d.index].text += d.text
            merged[d.index].logprobs += d.logprobs
            merged[d.index].finish_reason = d.finish_reason or merged[d.index].finish_reason
        choices = []
        for d in merged:
            if self.chat:
                choices.append({
                    "index": d.index, "message": {"role": "assistant", "content": d.text},
                    "logprobs": self._chat_logprobs(d.logprobs), "finish_reason": d.finish_reason,
                })  # fmt: skip
            else:
                choices.append({
                    "index": d.index, "text": d.text, "logprobs": self._completion_logprobs(d.index, d.logprobs, d.text),
                    "finish_reason": d.finish_reason,
                })  # fmt: skip
        out = self._envelope(choices, chunk=False)
        out["usage"] = usage(done)
        out["corolla"] = corolla_extras(done)
        return out

    def _chat_logprobs(self, entries: list[dict]) -> dict | None:
        if not self.params.logprobs:
            return None
        return {"content": entries, "refusal": None}

    def _completion_logprobs(self, index: int, entries: list[dict], text: str) -> dict | None:
        """The legacy format: parallel lists of tokens, their logprobs, top alternatives, text offsets."""
        if not self.params.logprobs:
            return None
        offsets = []
        for e in entries:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(e["token"])
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }
