"""The API's generation engine on an in-process chain (`LocalChain`): greedy output equal to `model.generate`,
stop strings, n choices, penalties, context checks, cancellation, and concurrent requests on one model object."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from tiny_models import write_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from corolla.api.engine import Done, Engine
from corolla.api.errors import ApiError
from corolla.api.schemas import SamplingParams
from corolla.client.local_chain import LocalChain
from corolla.client.model import AutoDistributedModelForCausalLM
from corolla.models.stack import BlockStack

VOCAB = 320
TEMPLATE = (
    "{% for m in messages %}w4 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)


class ClosingChain(LocalChain):
    """Counts sessions still open, to check that every request closes its own."""

    def __init__(self, stack):
        super().__init__(stack)
        self.open_sessions = 0
        self.lock = threading.Lock()
        self.step_hook = None  # called before every step

    def open_session(self, max_length, **options):
        session = super().open_session(max_length, **options)
        close, step = session.close, session.step
        with self.lock:
            self.open_sessions += 1

        def counted_close():
            with self.lock:
                self.open_sessions -= 1
            close()

        def hooked_step(*args, **kwargs):
            if self.step_hook is not None:
                self.step_hook()
            return step(*args, **kwargs)

        session.close, session.step = counted_close, hooked_step
        return session


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = write_llama(tmp_path_factory.mktemp("api-engine") / "tiny", max_position_embeddings=64)
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(checkpoint):
    stack = BlockStack.load(str(checkpoint), 0, 8, dtype=torch.float32, progress=False)
    chain = ClosingChain(stack)
    model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, chain=chain)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    engine = Engine(model, tokenizer, max_concurrent=4)
    yield model, tokenizer, engine, chain
    engine.shutdown()


def _collect(engine, prompt_ids, params, cancel_after: int | None = None, on_job=None):
    async def run():
        job = engine.submit(prompt_ids, params, "prompt")
        if on_job is not None:
            on_job(job)
        texts, reasons, steps = [""] * params.n, [None] * params.n, 0
        while True:
            event = await job.next()
            if isinstance(event, Done):
                return texts, reasons, event, steps
            steps += 1
            for d in event.deltas:
                texts[d.index] += d.text
                reasons[d.index] = d.finish_reason or reasons[d.index]
            if cancel_after is not None and steps == cancel_after:
                job.cancel()

    return asyncio.run(run())


def _greedy_reference(model, tokenizer, prompt_ids, max_new_tokens):
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt_ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def _prompt(seed: int, length: int = 6) -> list[int]:
    return torch.randint(6, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_equals_model_generate_and_reports_usage(setup):
    model, tokenizer, engine, chain = setup
    prompt = _prompt(1)
    expected, count = _greedy_reference(model, tokenizer, prompt, 12)
    (text,), (reason,), done, _ = _collect(engine, prompt, SamplingParams(max_tokens=12, temperature=0))
    assert text == expected
    assert (done.prompt_tokens, done.completion_tokens) == (len(prompt), count)
    assert reason == ("length" if count == 12 else "stop")
    assert chain.open_sessions == 0


def test_stop_string_cuts_the_answer(setup):
    model, tokenizer, engine, _ = setup
    prompt = _prompt(2)
    full, _ = _greedy_reference(model, tokenizer, prompt, 10)
    words = full.split()
    assert len(words) >= 4, full
    stop = " ".join(words[2:4])
    params = SamplingParams(max_tokens=10, temperature=0, stop=(stop,))
    (text,), (reason,), done, _ = _collect(engine, prompt, params)
    assert text == full[: full.index(stop)] and reason == "stop"
    assert done.completion_tokens == 4  # generation ended at the token that completed the stop string


def test_n_choices_sampled_with_seed_and_logprobs(setup):
    _, _, engine, _ = setup
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=11, logprobs=True, top_logprobs=2)
    texts, reasons, done, _ = _collect(engine, _prompt(3), params)
    again, _, _, _ = _collect(engine, _prompt(3), params)
    assert texts == again  # same seed, no other request running: same samples
    assert len(texts) == 3 and all(r in ("length", "stop") for r in reasons)
    assert done.completion_tokens <= 18


def test_penalties_change_greedy_output(setup):
    model, tokenizer, engine, _ = setup
    prompt = _prompt(4)
    plain, _ = _greedy_reference(model, tokenizer, prompt, 16)
    penalized = SamplingParams(max_tokens=16, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
    (text,), _, _, _ = _collect(engine, prompt, penalized)
    words = text.split()
    assert text != plain and len(set(words)) == len(words), (plain, text)  # a +2 penalty forbids repeats here


def test_context_length_checks(setup):
    _, _, engine, _ = setup

    async def submit(params):
        return engine.submit(list(range(6, 66)), params, "prompt")

    with pytest.raises(ApiError) as info:
        asyncio.run(submit(SamplingParams(max_tokens=10)))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in info.value.message
    with pytest.raises(ApiError) as info:
        asyncio.run(submit(SamplingParams(logit_bias={VOCAB: 1.0})))
    assert info.value.param == "logit_bias"


def test_cancel_stops_generation_and_closes_the_session(setup):
    _, _, engine, chain = setup
    jobs, steps = [], []

    def hold_after_three_steps():  # the 4th step waits until the request is cancelled
        steps.append(1)
        if len(steps) == 4:
            assert jobs[0].cancelled.wait(60)

    chain.step_hook = hold_after_three_steps
    try:
        params = SamplingParams(max_tokens=40, temperature=0, logit_bias={2: -100.0})  # no early eos
        _, (reason,), done, _ = _collect(engine, _prompt(5), params, cancel_after=3, on_job=jobs.append)
    finally:
        chain.step_hook = None
    # cancelled after the 3rd token's event: seen at the 3rd token's check or, at the latest, after the 4th step
    assert 3 <= done.completion_tokens <= 4 and reason is None
    assert chain.open_sessions == 0


def test_concurrent_requests_each_equal_their_solo_output(setup):
    model, tokenizer, engine, chain = setup
    prompts = [_prompt(10 + i, 4 + i) for i in range(4)]
    expected = [_greedy_reference(model, tokenizer, p, 12)[0] for p in prompts]

    async def run_all():
        async def one(prompt):
            job = engine.submit(prompt, SamplingParams(max_tokens=12, temperature=0), "prompt")
            text = ""
            while not isinstance(event := await job.next(), Done):
                text += "".join(d.text for d in event.deltas)
            return text

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run_all()) == expected
    assert chain.open_sessions == 0


def test_chat_prompt_uses_the_template(setup):
    _, tokenizer, engine, _ = setup
    ids = engine.chat_prompt([{"role": "user", "content": "w7 w8"}])
    assert tokenizer.convert_ids_to_tokens(ids) == ["w4", "w7", "w8", "w2", "w5"]
