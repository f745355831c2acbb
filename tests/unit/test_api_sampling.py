"""Pure pieces of the API: OpenAI's penalties, logprobs, stop strings, incremental text, response formats."""

from __future__ import annotations

import torch

from corolla.api.engine import ChoiceState, Delta, Done, Step
from corolla.api.responses import Formatter
from corolla.api.sampling import LogprobRecorder, OpenAIPenaltyProcessor, find_stop, held_back, top_logprobs
from corolla.api.schemas import SamplingParams


def test_penalties_follow_openais_formula():
    prompt = [5, 5, 6]  # prompt tokens are not counted
    generated = [[1, 1, 1, 2], [3, 3, 0, 0]]
    ids = torch.tensor([prompt + row for row in generated])
    scores = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    out = OpenAIPenaltyProcessor(len(prompt), presence_penalty=0.5, frequency_penalty=0.25)(ids, scores)
    expected = scores.clone()
    for b, row in enumerate(generated):
        for j in range(8):
            count = row.count(j)
            expected[b, j] -= count * 0.25 + (0.5 if count else 0.0)
    assert torch.allclose(out, expected)
    assert out[0, 5] == scores[0, 5]  # only in the prompt: untouched


def test_negative_penalties_encourage_repetition_and_logit_bias_adds():
    ids = torch.tensor([[9, 3]])
    scores = torch.zeros(1, 6)
    out = OpenAIPenaltyProcessor(1, presence_penalty=-1.0, logit_bias={4: -100.0, 0: 2.5})(ids, scores)
    assert out.tolist() == [[2.5, 0.0, 0.0, 1.0, -100.0, 0.0]]
    assert scores.abs().sum() == 0  # the input is not modified in place
    assert not OpenAIPenaltyProcessor(1).active


def test_logprob_recorder_and_top():
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    recorder = LogprobRecorder()
    assert recorder(torch.zeros(1, 1, dtype=torch.long), scores) is scores
    assert torch.allclose(recorder.last.exp().sum(-1), torch.ones(1))
    best = top_logprobs(recorder.last[0], 2)
    assert [t for t, _ in best] == [1, 2] and best[0][1] > best[1][1]
    assert top_logprobs(recorder.last[0], 0) == []


def test_find_stop_and_held_back():
    assert find_stop("hello world", ("wor", "lo")) == 3
    assert find_stop("hello world", ("xyz",)) is None
    assert find_stop("abcSTOP", ("STOP",), start=5) == 3  # a match reaching into new text is found
    assert find_stop("STOPabc", ("STOP",), start=5) is None  # entirely in old text: not rescanned
    assert held_back("abc ST", ("STOP",)) == 2
    assert held_back("abc S", ("STOP", "SX")) == 1
    assert held_back("abc", ("STOP",)) == 0
    assert held_back("abcSTO", ("STOP", "TOPS")) == 3


class CharTokenizer:
    """Token i is chr(i); id 0 is a special (skipped) token."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def _run(choice: ChoiceState, text: str) -> tuple[str, str | None]:
    out = ""
    for ch in text:
        delta = choice.add(ord(ch), False, None)
        if delta is not None:
            out += delta.text
        if choice.finish_reason:
            break
    if choice.finish_reason is None:
        out += choice.finish("length").text
    return out, choice.finish_reason


def test_choice_streams_exactly_the_text_before_a_stop_string():
    streamed, reason = _run(ChoiceState(0, CharTokenizer(), ("END", "xy")), "hello ENx END more")
    assert (streamed, reason) == ("hello ENx ", "stop")
    streamed, reason = _run(ChoiceState(0, CharTokenizer(), ("END",)), "no stop EN")
    assert (streamed, reason) == ("no stop EN", "length")  # held back, then flushed at the end


def test_choice_holds_back_a_possible_stop_prefix():
    choice = ChoiceState(0, CharTokenizer(), ("STOP",))
    texts = [getattr(choice.add(ord(c), False, None), "text", None) for c in "aST"]
    assert texts == ["a", None, None]  # "S", "ST" might start "STOP"
    assert choice.add(ord("x"), False, None).text == "STx"


def test_choice_eos_ends_without_text_and_counts_the_token():
    choice = ChoiceState(0, CharTokenizer(), ())
    choice.add(ord("a"), False, {"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []})
    delta = choice.add(2, True, None)
    assert delta.finish_reason == "stop" and delta.text == "" and choice.tokens == 2 and choice.text == "a"


def _done() -> Done:
    return Done(3, 4, [{"peer_id": "p", "name": "s", "start": 0, "end": 2}], 1, 0.5, 10.0, 1.0)


def test_chat_stream_chunks_and_final_usage():
    fmt = Formatter(True, "m", SamplingParams(n=2, stream=True, include_usage=True))
    route = [{"peer_id": "p", "name": "s", "start": 0, "end": 2}]
    (first,) = fmt.first_chunks(route)
    assert first["object"] == "chat.completion.chunk" and first["corolla"] == {"route": route}
    assert [c["delta"] for c in first["choices"]] == [{"role": "assistant", "content": ""}] * 2
    assert first["usage"] is None
    chunk = fmt.step_chunk(Step([Delta(1, "hi"), Delta(0, "", finish_reason="stop")]))
    assert "corolla" not in chunk
    assert chunk["choices"][0] == {"index": 1, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}
    assert chunk["choices"][1]["finish_reason"] == "stop" and chunk["choices"][1]["delta"] == {}
    assert fmt.step_chunk(Step([])) is None
    last, usage_chunk = fmt.finish(chunk, _done())
    assert last is chunk and usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert usage_chunk["corolla"]["failovers"] == 1 and usage_chunk["corolla"]["tokens_per_second"] == 10.0


def test_stream_without_usage_puts_extras_on_the_last_chunk():
    fmt = Formatter(False, "m", SamplingParams(stream=True))
    assert fmt.first_chunks(None) == []
    chunk = fmt.step_chunk(Step([Delta(0, "x", finish_reason="length")], route=[{"name": "s"}]))
    assert chunk["object"] == "text_completion" and chunk["corolla"] == {"route": [{"name": "s"}]}
    assert "usage" not in chunk
    (last,) = fmt.finish(chunk, _done())
    assert last["corolla"]["route"][0]["name"] == "s" and last["corolla"]["seconds"] == 1.0


def test_whole_responses_merge_deltas_and_logprobs():
    lp = lambda t: {"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": [  # noqa: E731
        {"token": t, "logprob": -0.5, "bytes": list(t.encode())}]}  # fmt: skip
    deltas = [Delta(0, "ab", [lp("a"), lp("b")]), Delta(0, "c", [lp("c")], "length")]
    chat = Formatter(True, "m", SamplingParams(logprobs=True, top_logprobs=1)).complete(deltas, _done())
    choice = chat["choices"][0]
    assert chat["object"] == "chat.completion" and choice["message"] == {"role": "assistant", "content": "abc"}
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["a", "b", "c"]
    assert choice["finish_reason"] == "length" and chat["usage"]["total_tokens"] == 7
    text = Formatter(False, "m", SamplingParams(logprobs=True, top_logprobs=1)).complete(deltas, _done())
    logprobs = text["choices"][0]["logprobs"]
    assert text["choices"][0]["text"] == "abc" and logprobs["tokens"] == ["a", "b", "c"]
    assert logprobs["text_offset"] == [0, 1, 2] and logprobs["top_logprobs"][0] == {"a": -0.5}
    assert Formatter(True, "m", SamplingParams()).complete(deltas, _done())["choices"][0]["logprobs"] is None
