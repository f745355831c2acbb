"""`corolla api` end to end: the real `openai` package against a live swarm of the offline demo checkpoint.

One module-scoped swarm (servers over blocks [0:4), [0:2) and [2:4), so any one of them can die) and one
API server subprocess (`python -m corolla.cli.api`, its own process group, ready when /v1/models answers).
The reference for every greedy answer is `model.generate` of a distributed model in this process. The test
that SIGKILLs a server runs last, as it leaves the swarm with one server less.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch
from swarm_harness import Swarm
from transformers import AutoTokenizer

from corolla.cli.demo_checkpoint import ensure_demo_checkpoint
from corolla.wire.records import ServerState

KEY = "test-key-123"
PREFIX = "demo-llama"
NUM_BLOCKS = 4
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
HANG_GUARD = 120  # seconds; only catches hangs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=HANG_GUARD) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_api(groups, checkpoint: Path, initial_peers: list[str], name: str, *args: str):
    """`corolla api` as a subprocess in its own process group; returns (proc, base_url) once it answers."""
    port = _free_port()
    cmd = ["-m", "corolla.cli.api", str(checkpoint), "--initial_peers", *initial_peers, "--port", str(port),
           "--api_key", KEY, "--missing_blocks_timeout", "3", *args]  # fmt: skip
    proc = groups.start(cmd, name)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"corolla api exited with {proc.returncode}:\n{proc.log_path.read_text()[-3000:]}"
            )
        try:
            if _http(base + "/v1/models")[0] == 200:
                return proc, base
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"corolla api did not answer in {HANG_GUARD} s; see {proc.log_path}")


def _stop(proc) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return ensure_demo_checkpoint(tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="module")
def groups(session_processes, tmp_path_factory):
    """This module's own process groups (and log folder), reaped when the module is done."""
    groups = type(session_processes)(tmp_path_factory.mktemp("api-logs"))
    yield groups
    groups.kill_all()


@pytest.fixture(scope="module")
def swarm(groups, checkpoint):
    swarm = Swarm(groups, groups.log_dir)
    swarm.start_dht()
    for name, blocks in (("full", "0:4"), ("left", "0:2"), ("right", "2:4")):
        swarm.start_server(name, checkpoint, "--block_indices", blocks, wait=False)
    for proc in swarm.servers.values():
        swarm.wait_state(proc, ServerState.ONLINE, PREFIX, NUM_BLOCKS)
    yield swarm
    swarm.close()


@pytest.fixture(scope="module")
def api(groups, swarm, checkpoint):
    proc, base = start_api(groups, checkpoint, swarm.initial_peers, "api")
    proc.base = base
    yield proc
    _stop(proc)


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.base + "/v1", api_key=KEY, max_retries=0, timeout=HANG_GUARD)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model(swarm, checkpoint):
    from corolla import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
    yield model
    model.shutdown()


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """model.generate's greedy continuation: its text (special tokens skipped) and token count up to eos."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(prompt_ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def read_chat_stream(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# -- the API -----------------------------------------------------------------------------------------


def test_models_auth_and_error_format(api, client, checkpoint):
    assert [m.id for m in client.models.list().data] == [str(checkpoint)]
    assert client.models.retrieve(PREFIX).id == str(checkpoint)  # the DHT prefix is accepted as an alias
    bad = openai.OpenAI(base_url=api.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    status, body = _http(api.base + "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = _http(api.base + "/v1/chat/completions", body=b'{"model": "x", "messages": [')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = _http(api.base + "/v1/nothing-here")
    assert status == 404 and body["error"]["type"] == "not_found_error"


def test_chat_greedy_equals_model_generate(client, model, tokenizer, checkpoint):
    expected, count = greedy(model, tokenizer, chat_ids(tokenizer, "Tell me about the ferry."), 24)
    reply = client.chat.completions.create(
        model=str(checkpoint), messages=[{"role": "user", "content": "Tell me about the ferry."}],
        max_tokens=24, temperature=0,
    )  # fmt: skip
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == count
    assert reply.usage.prompt_tokens == len(chat_ids(tokenizer, "Tell me about the ferry."))
    assert reply.choices[0].finish_reason == ("length" if count == 24 else "stop")
    extras = reply.model_extra["corolla"]
    assert extras["route"] and extras["route"][0]["start"] == 0 and extras["route"][-1]["end"] == NUM_BLOCKS
    assert extras["tokens_per_second"] > 0


def test_chat_stream_matches_and_ends_with_usage(client, model, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What grows in a garden?"}]
    whole = client.chat.completions.create(model=PREFIX, messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model=PREFIX, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    text, chunks = read_chat_stream(stream)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model_extra["corolla"]["route"]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert chunks[-1].model_extra["corolla"]["tokens_per_second"] > 0
    logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert logprobs and all(len(lp.top_logprobs) == 3 and lp.logprob <= 0 for lp in logprobs)
    assert all(lp.logprob == pytest.approx(lp.top_logprobs[0].logprob) for lp in logprobs)  # greedy: the top token


def test_completions_plain_and_streamed(client, model, tokenizer):
    prompt = "A garden teaches patience"
    expected, count = greedy(model, tokenizer, tokenizer(prompt)["input_ids"], 16)
    reply = client.completions.create(model=PREFIX, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    assert reply.object == "text_completion" and reply.choices[0].text == expected
    assert reply.usage.completion_tokens == count
    assert len(reply.choices[0].logprobs.tokens) == len(reply.choices[0].logprobs.token_logprobs) > 0
    chunks = list(
        client.completions.create(model=PREFIX, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def test_sampling_options_are_applied(client, model, tokenizer):
    prompt = "Computers are very fast"
    plain = client.completions.create(model=PREFIX, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    stop = plain[len(plain) // 3 : len(plain) // 3 + 3]
    cut = client.completions.create(model=PREFIX, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == plain[: plain.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=PREFIX, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9,
                                         seed=5, n=2) for _ in range(2)]  # fmt: skip
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # same seed, same samples
    assert len(sampled[0].choices) == 2 and sampled[0].usage.completion_tokens <= 16
    texts = ["", ""]
    for chunk in client.completions.create(model=PREFIX, prompt=prompt, max_tokens=12, temperature=0, n=2,
                                           stream=True):  # fmt: skip
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [plain, plain]  # two greedy choices, streamed side by side
    different_seed = client.completions.create(model=PREFIX, prompt=prompt, max_tokens=8, temperature=1.0, top_p=0.9,
                                               seed=6, n=2)  # fmt: skip
    assert [c.text for c in different_seed.choices] != [c.text for c in sampled[0].choices]


def test_penalties_equal_generate_with_openais_rule(client, model, tokenizer):
    from transformers import LogitsProcessorList

    from corolla.api.sampling import OpenAIPenaltyProcessor

    prompt = "Computers are very fast"
    ids = tokenizer(prompt)["input_ids"]
    x = torch.tensor([ids])
    rule = OpenAIPenaltyProcessor(len(ids), presence_penalty=1.5, frequency_penalty=0.5)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
                         logits_processor=LogitsProcessorList([rule]))  # fmt: skip
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    reply = client.completions.create(model=PREFIX, prompt=prompt, max_tokens=16, temperature=0,
                                      presence_penalty=1.5, frequency_penalty=0.5)  # fmt: skip
    assert reply.choices[0].text == tokenizer.decode(new, skip_special_tokens=True)
    plain = client.completions.create(model=PREFIX, prompt=prompt, max_tokens=16, temperature=0)
    assert plain.choices[0].text != reply.choices[0].text  # the penalties did change the answer


def test_request_errors(client, checkpoint):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=PREFIX, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=PREFIX, prompt="word " * 2100, max_tokens=10)
    assert info.value.code == "context_length_exceeded" and "2048" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=PREFIX, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4000, stream=True)  # fmt: skip
    assert info.value.code == "context_length_exceeded"


def test_missing_blocks_is_503_naming_them(processes, swarm, checkpoint):
    proc, base = start_api(
        processes, checkpoint, swarm.initial_peers, "api-empty", "--dht_prefix", "nobody-serves-this"
    )
    try:
        empty = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=HANG_GUARD)
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                empty.chat.completions.create(model=str(checkpoint), messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, stream=stream)  # fmt: skip
            assert info.value.status_code == 503 and info.value.code == "missing_blocks"
            assert "block(s) 0-3" in info.value.message and "nobody-serves-this" in info.value.message
    finally:
        _stop(proc)


def test_concurrent_streams_each_equal_their_solo_output(client, model, tokenizer):
    questions = ["Where does the river go?", "Why plant beans?", "What is a program?", "Who built the bridge?"]
    expected = [greedy(model, tokenizer, chat_ids(tokenizer, q), 24)[0] for q in questions]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = client.chat.completions.create(model=PREFIX, messages=[{"role": "user", "content": questions[i]}],
                                                max_tokens=24, temperature=0, stream=True)  # fmt: skip
        got[i] = read_chat_stream(stream)[0]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD)
    assert [got.get(i) for i in range(len(questions))] == expected


def _free_cache(swarm) -> dict[str, int]:
    return {peer: info.free_cache_tokens for servers in swarm.records(PREFIX, NUM_BLOCKS)
            for peer, info in servers.items()}  # fmt: skip


def _settled_free_cache(swarm) -> dict[str, int]:
    """Free cache tokens once the servers' announcements stop changing (they are re-announced every 2 s)."""
    deadline = time.monotonic() + HANG_GUARD
    reads = [_free_cache(swarm)]
    while time.monotonic() < deadline:
        time.sleep(1.5)
        reads.append(_free_cache(swarm))
        if len(reads) >= 3 and reads[-1] == reads[-2] == reads[-3]:
            return reads[-1]
    raise AssertionError(f"free cache never settled: {reads[-3:]}")


def test_disconnect_stops_generation_and_frees_server_caches(api, client, swarm):
    idle = _settled_free_cache(swarm)
    stream = client.chat.completions.create(
        model=PREFIX, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=1800,
        temperature=0, stream=True, logit_bias={"2": -100},  # never end on eos: only the disconnect stops it
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 5:
            break
    # while generating, the servers hold the session's cache
    deadline = time.monotonic() + HANG_GUARD
    while not any(free < idle.get(peer, 0) for peer, free in _free_cache(swarm).items()):
        assert time.monotonic() < deadline, "the servers never showed the session's cache"
        time.sleep(0.2)
    stream.close()
    deadline = time.monotonic() + HANG_GUARD
    while _free_cache(swarm) != idle and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _free_cache(swarm) == idle, "the servers still hold the disconnected request's cache"
    log = api.log_path.read_text()
    assert "client disconnected mid-stream" in log and "stopped (client went away)" in log

    # a non-streamed request whose client hangs up while it waits
    body = json.dumps({"model": PREFIX, "prompt": "Once", "max_tokens": 1800, "temperature": 0,
                       "logit_bias": {"2": -100}}).encode()  # fmt: skip
    port = int(api.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        deadline = time.monotonic() + HANG_GUARD
        while not any(free < idle.get(peer, 0) for peer, free in _free_cache(swarm).items()):
            assert time.monotonic() < deadline, "the servers never showed the session's cache"
            time.sleep(0.2)
    deadline = time.monotonic() + HANG_GUARD
    while _free_cache(swarm) != idle and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _free_cache(swarm) == idle, "the servers still hold the cache of a request whose client hung up"
    assert "client disconnected, stopping its generation" in api.log_path.read_text()


# -- the web chat ------------------------------------------------------------------------------------


def test_web_chat_streams_an_answer_in_chromium(api, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server", "--window-size=1100,800", f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)  # fmt: skip
    try:
        driver.get(api.base + "/")
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("40")
        driver.find_element(By.ID, "prompt").send_keys("Tell me about the garden.")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, HANG_GUARD).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant .meta[data-done='1']")
        )
        answer = driver.find_element(By.CSS_SELECTOR, ".assistant .content")
        meta = driver.find_element(By.CSS_SELECTOR, ".assistant .meta").text
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "api_web_chat.png"
        driver.save_screenshot(str(shot))
        print(f"web chat screenshot: {shot}")
        assert "error" not in meta, meta
        assert answer.text.strip() and int(answer.get_attribute("data-updates")) > 1  # it grew chunk by chunk
        assert "tokens/s" in meta and "[0:" in meta, meta
        assert driver.find_element(By.CSS_SELECTOR, ".user .content").text == "Tell me about the garden."
    finally:
        driver.quit()


# -- a server dies mid-answer (last: it leaves the swarm a server short) -----------------------------


def test_server_killed_mid_stream_the_answer_is_unchanged(client, model, tokenizer, swarm):
    question = "Tell me everything about the valley."
    expected, count = greedy(model, tokenizer, chat_ids(tokenizer, question), 300)
    stream = client.chat.completions.create(model=PREFIX, messages=[{"role": "user", "content": question}],
                                            max_tokens=300, temperature=0, stream=True)  # fmt: skip
    by_peer = {p.peer_id: p for p in swarm.servers.values()}
    text, victim, last = "", None, None
    for chunk in stream:
        last = chunk
        if victim is None:
            victim = by_peer[chunk.model_extra["corolla"]["route"][0]["peer_id"]]
            os.killpg(victim.pid, signal.SIGKILL)  # the server and its helpers, mid-answer
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    extras = last.model_extra["corolla"]
    assert text == expected
    assert extras["failovers"] >= 1, "the kill landed after the answer was complete"
    assert victim.peer_id not in {hop["peer_id"] for hop in extras["route"]}
