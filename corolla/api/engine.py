"""One transformers ``generate`` call per API request, on a distributed model shared by all requests.

Decisions:

- **A session per request, in its own thread.** Each request runs in a worker thread with its own
  ``model.inference_session`` passed explicitly to ``generate``. The model's notion of an *active*
  session is kept per thread (``DistributedModelForCausalLM._active_sessions`` is keyed by thread id),
  the session object holds the token history, and the chain's network work for all sessions runs on
  the client's one event loop; so concurrent requests share the model object safely and never see
  each other's tokens (tests/integration/test_api.py checks each concurrent answer against its solo
  greedy output).
- **Generation is transformers'.** Temperature, top-p and greedy decoding are transformers'
  processors; the request's penalties and logprob recorder are passed as ``logits_processor``; the
  `RequestTracker` is a ``StoppingCriteria``: it sees each new token before transformers decides
  whether a row is done, so it can end a row exactly at a stop string, stream the token's text, and end
  everything at once when the HTTP client has gone away.
- **Events cross to asyncio** through ``loop.call_soon_threadsafe`` into the job's queue: a `Step`
  per generated token (text deltas per choice), then `Done` (usage, route, speed) or an exception.
- **Failover is the session's.** A server dying mid-answer is handled inside the inference session;
  nothing here retries, so the HTTP stream just continues. The route reported is the session's.
- **Disconnects.** ``Job.cancel()`` makes the tracker stop every row at the next token; the
  ``with session`` block then closes the session, and the servers free its cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from corolla.api.errors import ApiError, from_exception, invalid
from corolla.api.sampling import LogprobRecorder, OpenAIPenaltyProcessor, find_stop, held_back, top_logprobs
from corolla.api.schemas import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class Delta:
    """New output of one choice: text, its tokens' logprobs (if asked), and the finish reason once done."""

    index: int
    text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Step:
    deltas: list[Delta]
    route: list[dict] | None = None  # on the first step: the servers the session opened


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int
    route: list[dict]
    failovers: int
    time_to_first_token: float
    tokens_per_second: float
    seconds: float


class ChoiceState:
    """The text of one choice so far: incremental decoding, stop strings, and what was streamed."""

    def __init__(self, index: int, tokenizer, stops: tuple[str, ...]):
        self.index, self.tokenizer, self.stops = index, tokenizer, stops
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut at a stop string once one is found
        self.sent = 0  # characters of text already streamed
        self.pending: list[dict] = []  # logprobs not streamed yet
        self.finish_reason: str | None = None
        self.tokens = 0  # generated tokens, eos included

    def add(self, token: int, is_eos: bool, logprob: dict | None) -> Delta | None:
        self.tokens += 1
        if is_eos:
            return self.finish("stop")
        self.ids.append(token)
        if logprob is not None:
            self.pending.append(logprob)
        before = len(self.text)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = find_stop(self.text, self.stops, before) if self.stops else None
        if cut is not None:
            self.text = self.text[:cut]
            return self.finish("stop")
        end = len(self.text) - held_back(self.text, self.stops)
        if self.text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            end = min(end, len(self.text) - 1)
        return self._delta(max(end, self.sent))

    def finish(self, reason: str) -> Delta:
        self.finish_reason = reason
        return self._delta(len(self.text))

    def _delta(self, end: int) -> Delta | None:
        text, self.sent = self.text[self.sent : end], max(self.sent, end)
        logprobs, self.pending = (self.pending, []) if text or self.finish_reason else ([], self.pending)
        if not text and not logprobs and self.finish_reason is None:
            return None
        return Delta(self.index, text, logprobs, self.finish_reason)


class RequestTracker(StoppingCriteria):
    """Follows every row of one generate call; emits a `Step` per token; stops rows (see module doc)."""

    def __init__(self, job: Job, tokenizer, eos_ids: set[int], recorder: LogprobRecorder | None, session):
        self.job, self.tokenizer, self.eos_ids = job, tokenizer, eos_ids
        self.recorder, self.session = recorder, session
        self.choices = [ChoiceState(i, tokenizer, job.params.stop) for i in range(job.params.n)]
        self.first_token_at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        route = None
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            route = describe_route(self.session)
        tokens = input_ids[:, -1].tolist()
        deltas = []
        for choice, token in zip(self.choices, tokens):
            if choice.finish_reason is not None:
                continue
            delta = choice.add(token, token in self.eos_ids, self._logprob(choice.index, token))
            if delta is not None:
                deltas.append(delta)
        if deltas or route:
            self.job.emit(Step(deltas, route))
        if self.job.cancelled.is_set():
            return torch.ones(len(tokens), dtype=torch.bool, device=input_ids.device)
        done = [c.finish_reason is not None for c in self.choices]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _logprob(self, row: int, token: int) -> dict | None:
        if self.recorder is None or self.recorder.last is None:
            return None
        lp = self.recorder.last[row]
        entry = self._token_entry(token, float(lp[token]))
        entry["top_logprobs"] = [
            self._token_entry(t, v) for t, v in top_logprobs(lp, self.job.params.top_logprobs)
        ]
        return entry

    def _token_entry(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def finish(self) -> None:
        """After generate returns: rows still open ran out of tokens."""
        deltas = [c.finish("length") for c in self.choices if c.finish_reason is None]
        if deltas:
            self.job.emit(Step(deltas))


def describe_route(session) -> list[dict]:
    """The servers of a generation session's chain: peer id, public name, blocks [start, end)."""
    return [dataclasses.asdict(hop) for hop in session.chain_session.describe_route()]


class Job:
    """One request's generation: its events (an asyncio queue) and its cancel flag."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, max_tokens: int, loop):
        self.id = uuid.uuid4().hex[:12]
        self.prompt_ids, self.params, self.max_tokens, self.loop = prompt_ids, params, max_tokens, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.created = time.perf_counter()

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self) -> Step | Done:
        """The next event; a generation error is raised as an `ApiError`."""
        event = await self.events.get()
        if isinstance(event, BaseException):
            raise from_exception(event)
        return event


class Engine:
    """Tokenizes prompts, checks them against the context, and runs generate jobs in worker threads."""

    def __init__(self, model, tokenizer, context_length: int | None = None, max_concurrent: int = 32):
        self.model, self.tokenizer = model, tokenizer
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", None) or 4096
        self.vocab_size = model.config.vocab_size
        self._executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="corolla-api")
        self._jobs: set[Job] = set()
        base = model.generation_config
        eos = base.eos_token_id if base.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = base.pad_token_id if base.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    # -- prompts -------------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("this model's tokenizer has no chat template; use /v1/completions", "messages",
                          "unsupported_model")  # fmt: skip
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject a conversation (roles out of order, ...)
            raise invalid(f"the model's chat template rejected these messages: {e}", "messages") from e
        # the template writes the special tokens (BOS) itself
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def completion_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            if max(prompt) >= self.vocab_size:
                raise invalid(f"'prompt' has a token id over the vocabulary size {self.vocab_size}", "prompt")
            return prompt
        return self.tokenizer(prompt)["input_ids"]

    # -- jobs ----------------------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams, param: str = "messages") -> Job:
        """Check the request against the context and start generating (the first event is awaited by the caller)."""
        if not prompt_ids:
            raise invalid(f"the {param} encode to no tokens; there is nothing to continue", param)
        max_tokens = self._max_tokens(len(prompt_ids), params.max_tokens, param)
        if any(t >= self.vocab_size for t in params.logit_bias):
            raise invalid(f"'logit_bias' has a token id over the vocabulary size {self.vocab_size}", "logit_bias")
        job = Job(prompt_ids, params, max_tokens, asyncio.get_running_loop())
        self._jobs.add(job)
        future = self._executor.submit(self._run, job)
        future.add_done_callback(lambda _: self._jobs.discard(job))
        return job

    def _max_tokens(self, prompt: int, requested: int | None, param: str) -> int:
        room = self.context_length - prompt
        if requested is None and room > 0:
            return room
        if requested is None or prompt + requested > self.context_length:
            asked = f"{prompt + (requested or 0)} tokens ({prompt} in the {'messages' if param == 'messages' else 'prompt'}"
            asked += f", {requested} in the completion)" if requested else ")"
            raise ApiError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{asked}. Please reduce the length of the {param} or the completion.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        try:
            job.emit(self._generate(job))
        except BaseException as e:  # noqa: BLE001 - every failure goes to the waiting request
            if not isinstance(e, ApiError) and not job.cancelled.is_set():
                logger.warning("Request %s failed: %r", job.id, e)
            job.emit(e)

    def _generate(self, job: Job) -> Done:
        params, prompt = job.params, len(job.prompt_ids)
        ids = torch.tensor([job.prompt_ids] * params.n, dtype=torch.long)
        processors = LogitsProcessorList()
        penalty = OpenAIPenaltyProcessor(
            prompt, params.presence_penalty, params.frequency_penalty, params.logit_bias
        )
        if penalty.active:
            processors.append(penalty)
        recorder = LogprobRecorder() if params.logprobs else None
        if recorder is not None:
            processors.append(recorder)
        if params.seed is not None:
            torch.manual_seed(params.seed)  # the process-wide generator: reproducible when requests do not overlap
        with self.model.inference_session(max_length=prompt + job.max_tokens) as session:
            tracker = RequestTracker(job, self.tokenizer, self.eos_ids, recorder, session)
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                generation_config=self._generation_config(params, job.max_tokens),
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([tracker]),
                session=session,
            )
            if not job.cancelled.is_set():
                tracker.finish()
            route, failovers = describe_route(session), session.chain_session.failovers
        end = time.perf_counter()
        first = tracker.first_token_at or end
        generated = sum(c.tokens for c in tracker.choices)
        done = Done(
            prompt_tokens=prompt,
            completion_tokens=generated,
            route=route,
            failovers=failovers,
            time_to_first_token=first - job.created,
            tokens_per_second=(generated - params.n) / (end - first)
            if end > first and generated > params.n
            else 0.0,
            seconds=end - job.created,
        )
        how = "stopped (client went away)" if job.cancelled.is_set() else "done"
        logger.info(
            "Request %s %s: %d prompt + %d generated tokens in %.2f s (%.1f tokens/s), route %s%s",
            job.id, how, prompt, generated, done.seconds, done.tokens_per_second,
            " -> ".join(f"[{h['start']}:{h['end']}) {h['name']}" for h in route) or "-",
            f", {failovers} failover(s)" if failovers else "",
        )  # fmt: skip
        return done

    def _generation_config(self, params: SamplingParams, max_tokens: int) -> GenerationConfig:
        options = dict(
            max_new_tokens=max_tokens,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.pad_id,
            bos_token_id=self.model.generation_config.bos_token_id,
            num_beams=1,
        )
        if params.greedy:
            return GenerationConfig(do_sample=False, **options)
        return GenerationConfig(
            do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0, **options
        )

    def shutdown(self) -> None:
        """Stop every running generation (their sessions close) and the worker threads."""
        for job in list(self._jobs):
            job.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)
