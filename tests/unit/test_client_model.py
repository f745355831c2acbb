"""The HF-compatible client model against transformers, on tiny random checkpoints and a `LocalChain`.

Every comparison is with transformers' own model on the same checkpoint: logits, greedy and sampled
generation (plain and left-padded batches), eos stopping, multi-turn sessions (only new tokens reach the
chain), streamers, `model.model.layers`, a Petals-style script, and the session's length limit.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from corolla.client.generation import SessionLengthError
from corolla.client.local_chain import LocalChain
from corolla.client.model import MODEL_CLASSES, AutoDistributedModelForCausalLM, DistributedLlamaForCausalLM
from corolla.models.registry import UnsupportedModelError
from corolla.models.stack import BlockStack

VOCAB, LAYERS, PAD, BOS, EOS = 96, 3, 0, 1, 2
GEOMETRY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)


class RecordingChain(LocalChain):
    """A LocalChain that records what reaches it: forward lengths, step lengths, closed sessions."""

    def __init__(self, stack: BlockStack):
        super().__init__(stack)
        self.forwards: list[int] = []
        self.steps: list[int] = []
        self.closed = 0

    def forward(self, hidden, positions, attention_mask, start=0, end=None, **options):
        self.forwards.append(hidden.shape[1])
        return super().forward(hidden, positions, attention_mask, start, end, **options)

    def open_session(self, max_length, **options):
        session, chain = super().open_session(max_length, **options), self
        step, close = session.step, session.close

        def recording_step(hidden, positions, attention_mask, hypo_ids=None):
            chain.steps.append(hidden.shape[1])
            return step(hidden, positions, attention_mask, hypo_ids=hypo_ids)

        def recording_close():
            chain.closed += 1
            close()

        session.step, session.close = recording_step, recording_close
        return session


def _tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: "w17" is token 17."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def _save(folder: Path, config, seed: int = 0) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="150KB")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = _save(tmp_path_factory.mktemp("tiny-llama"), LlamaConfig(**GEOMETRY))
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(checkpoint) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def stack(checkpoint) -> BlockStack:
    return BlockStack.load(str(checkpoint), 0, LAYERS, dtype=torch.float32, progress=False)


@pytest.fixture()
def chain(stack) -> RecordingChain:
    return RecordingChain(stack)


@pytest.fixture()
def model(checkpoint, chain) -> DistributedLlamaForCausalLM:
    return AutoDistributedModelForCausalLM.from_pretrained(checkpoint, chain=chain)


def _prompts(batch: int = 1, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = _prompts(3, 9), torch.ones(3, 9, dtype=torch.long)
    for row, pads in enumerate((0, 3, 6)):
        ids[row, :pads], mask[row, :pads] = PAD, 0
    return ids, mask


def test_loads_only_the_client_head(model, reference):
    assert type(model) is DistributedLlamaForCausalLM and "llama" in MODEL_CLASSES
    assert model.config_class is LlamaConfig and model.main_input_name == "input_ids"
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == reference.generation_config.eos_token_id == EOS
    names = {name for name, _ in model.named_parameters()}
    assert names == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert len(model.model.layers) == LAYERS


def test_forward_logits_and_loss(model, reference, chain):
    ids = _prompts(2, 8)
    labels = ids.clone()
    labels[0, :3] = -100
    ours, theirs = model(ids, labels=labels), reference(ids, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    ours.loss.backward()  # autograd runs through the chain to the client's embeddings
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert chain.forwards == [8] and chain.steps == []


def test_forward_with_padding_mask(model, reference):
    ids, mask = _left_padded()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-4, rtol=0)


def test_layers_run_the_blocks(model, stack):
    hidden = torch.randn(2, 5, 64)
    positions, mask = torch.arange(5).expand(2, 5), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model.model.layers(hidden), stack(hidden, positions, mask))
        torch.testing.assert_close(
            model.model.layers[1:](hidden), stack(hidden, positions, mask, None, 0, (1, LAYERS))
        )


def test_greedy_generate_is_token_exact(model, reference, chain):
    ids = _prompts()
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    assert chain.steps == [7] + [1] * 11  # prefill, then one token per step; never a whole sequence again
    assert chain.forwards == [] and chain.closed == 1


def test_generate_outputs_and_embeddings(model, reference):
    ids = _prompts()
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    ours, theirs = model.generate(ids, **kwargs), reference.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, theirs.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=1e-4, rtol=0)
    embeds = reference.get_input_embeddings()(ids).detach()  # transformers returns only the new tokens here
    expected = reference.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=5, do_sample=False), expected)


def test_left_padded_batch(model, reference):
    ids, mask = _left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_sampling_matches_under_the_same_seed(model, reference):
    ids, mask = _left_padded()
    kwargs = dict(attention_mask=mask, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    kwargs.update(repetition_penalty=1.3, max_new_tokens=12, pad_token_id=PAD)
    torch.manual_seed(7)
    expected = reference.generate(ids, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(model.generate(ids, **kwargs), expected)


def test_eos_stops_generation(model, reference):
    ids, mask = _left_padded()
    free = reference.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    eos = int(free[0, ids.shape[1] + 2])  # the first row emits it as its 3rd new token
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    ours = model.generate(ids, **kwargs)
    assert torch.equal(ours, reference.generate(ids, **kwargs))
    assert (ours[0, ids.shape[1] + 3 :] == PAD).all()


def _one_shot(reference, ids: torch.Tensor, new: int) -> torch.Tensor:
    """transformers on the whole history. The mask is explicit: generated tokens may equal the pad id, and
    transformers would take them for padding if it had to guess the mask from the ids."""
    return reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


def test_multi_turn_session_sends_only_new_tokens(model, reference, chain):
    first, second = _prompts(1, 6, seed=2), _prompts(1, 4, seed=3)
    with model.inference_session(max_length=64) as session:
        turn1 = model.generate(first, max_new_tokens=5, session=session)
        turn2 = model.generate(second, max_new_tokens=5, session=session)
        turn3 = model.generate(max_new_tokens=3)  # the active session; no new tokens: just continue
        # as in Petals: each call returns its own inputs and the new tokens, earlier calls' tokens cropped
        assert (turn1.shape[1], turn2.shape[1], turn3.shape[1]) == (6 + 5, 4 + 5, 3)
        history = torch.cat([turn1, turn2, turn3], 1)
        assert session.position == history.shape[1] - 1  # every token but the last sampled one was sent
    assert torch.equal(turn1, _one_shot(reference, first, 5))
    assert torch.equal(torch.cat([turn1, turn2], 1), _one_shot(reference, torch.cat([turn1, second], 1), 5))
    assert torch.equal(history, _one_shot(reference, torch.cat([turn1, turn2], 1), 3))
    assert sum(chain.steps) == history.shape[1] - 1 and chain.forwards == []
    assert chain.steps[5] == 1 + 4  # turn 2 starts with turn 1's unsent last token, then its new tokens
    assert chain.closed == 1 and session.closed


def test_multi_turn_left_padded_batch(model, reference):
    ids, mask = _left_padded()
    more = _prompts(3, 2, seed=4)
    with model.inference_session(max_length=40) as session:
        turn1 = model.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, session=session)
        turn2 = model.generate(more, max_new_tokens=4, pad_token_id=PAD, session=session)
    full_mask = torch.cat([mask, torch.ones(3, turn1.shape[1] - ids.shape[1] + 2, dtype=torch.long)], 1)
    kwargs = dict(attention_mask=full_mask, max_new_tokens=4, pad_token_id=PAD, do_sample=False)
    assert torch.equal(torch.cat([turn1, turn2], 1), reference.generate(torch.cat([turn1, more], 1), **kwargs))


def test_stepping_a_session_by_hand(model, reference):
    ids = _prompts(1, 9)
    with torch.no_grad():
        expected = reference(ids).logits
        with model.inference_session(max_length=16):
            prefill = model(ids[:, :5]).logits
            new_only = model(ids[:, 5:6]).logits  # only the new token
            full = model(ids[:, :8]).logits  # the whole history: the session sends tokens 6..7
            with_mask = model(ids[:, 8:], attention_mask=torch.ones(1, 9)).logits  # HF-style mask
    assert (prefill.shape[1], new_only.shape[1], full.shape[1], with_mask.shape[1]) == (5, 1, 2, 1)
    got = torch.cat([prefill, new_only, full, with_mask], dim=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


class _Collector(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        self.ended = True


def test_streamers(model, capsys):
    ids = _prompts()
    collector = _Collector()
    out = model.generate(ids, max_new_tokens=6, streamer=collector)
    assert collector.ended and torch.equal(torch.cat(collector.chunks), out[0])
    tokenizer = _tokenizer()
    model.generate(ids, max_new_tokens=6, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out.strip() == tokenizer.decode(out[0, ids.shape[1] :]).strip()


def test_session_overflow_raises(model):
    ids = _prompts(1, 6)
    with model.inference_session(max_length=8) as session:
        with pytest.raises(SessionLengthError, match="max_length=8"):
            model.generate(ids, max_new_tokens=10, session=session)
    with model.inference_session(max_length=4), pytest.raises(SessionLengthError):
        model(ids)


@pytest.mark.parametrize("num_beams, batch", [(3, 1), (2, 2)])
def test_beam_search_equals_transformers(model, reference, num_beams, batch):
    """transformers' beam search reorders hypotheses every step; the chain's caches follow (hypo_ids)."""
    ids = _prompts(batch, 6, seed=5)
    options = dict(num_beams=num_beams, max_new_tokens=8, do_sample=False, num_return_sequences=num_beams)
    expected = reference.generate(ids, **options)
    ours = model.generate(ids, **options)
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    assert not torch.equal(expected[:, ids.shape[1] :].unique(dim=0), expected[:1, ids.shape[1] :])  # beams differ


def test_a_rewritten_history_is_refused_by_name(model):
    ids = _prompts(2, 5)
    with model.inference_session(max_length=16) as session:
        model.generate(ids, max_new_tokens=2, session=session)
        other = torch.cat([_prompts(2, 5, seed=9), ids.new_zeros(2, 2)], dim=1)
        with pytest.raises(RuntimeError, match="no longer starts with the tokens this session sent"):
            session.prepare_step(model.model.embed_tokens, other, None, None, None, full_history=True)


PETALS_SCRIPT = """
import sys, torch
from transformers import AutoTokenizer
from corolla import AutoDistributedModelForCausalLM
from corolla.client.local_chain import LocalChain
from corolla.models.stack import BlockStack

model_name = sys.argv[1]
chain = LocalChain(BlockStack.load(model_name, 0, {layers}, dtype=torch.float32, progress=False))
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoDistributedModelForCausalLM.from_pretrained(model_name, torch_dtype=torch.float32, chain=chain)
inputs = tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
outputs = model.generate(inputs, max_new_tokens=4)
print("ONE", tokenizer.decode(outputs[0]))
with model.inference_session(max_length=32) as sess:
    for prompt in ("w8 w9", "w10"):
        inputs = tokenizer(prompt, return_tensors="pt")["input_ids"]
        outputs = model.generate(inputs, max_new_tokens=2, session=sess)
print("CHAT", tokenizer.decode(outputs[0]))
"""


def test_petals_style_script(checkpoint, reference):
    light = subprocess.run(
        [sys.executable, "-c", "import sys, corolla; print('transformers' in sys.modules, 'torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert light.stdout.split() == ["False", "False"]
    script = PETALS_SCRIPT.format(layers=LAYERS)
    run = subprocess.run(
        [sys.executable, "-c", script, str(checkpoint)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("ONE", "CHAT")))
    tokenizer = _tokenizer()
    prompt = tokenizer("w5 w6 w7", return_tensors="pt")["input_ids"]
    assert lines["ONE"] == tokenizer.decode(_one_shot(reference, prompt, 4)[0])
    history = _one_shot(reference, tokenizer("w8 w9", return_tensors="pt")["input_ids"], 2)
    last = tokenizer("w10", return_tensors="pt")["input_ids"]
    history = torch.cat([history, last], 1)
    # a generate in a session returns its own inputs and the new tokens (Petals' convention)
    assert lines["CHAT"] == tokenizer.decode(
        _one_shot(reference, history, 2)[0, history.shape[1] - last.shape[1] :]
    )


@pytest.mark.parametrize(
    "config",
    [LlamaConfig(**GEOMETRY, tie_word_embeddings=True), MistralConfig(**GEOMETRY), Qwen2Config(**GEOMETRY)],
    ids=["llama-tied", "mistral", "qwen2"],
)
def test_other_families_dispatch_by_model_type(tmp_path, config):
    if config.model_type not in MODEL_CLASSES:
        pytest.skip(f"{config.model_type} is not supported by corolla.models yet")
    folder = _save(tmp_path, config, seed=3)
    chain = LocalChain(BlockStack.load(str(folder), 0, LAYERS, dtype=torch.float32, progress=False))
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, chain=chain)
    assert type(model) is MODEL_CLASSES[config.model_type]
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _prompts()
    assert torch.equal(model.generate(ids, max_new_tokens=8), reference.generate(ids, max_new_tokens=8))
    if config.model_type != "llama":
        with pytest.raises(UnsupportedModelError, match="AutoDistributedModelForCausalLM"):
            DistributedLlamaForCausalLM.from_pretrained(folder, chain=chain)


def test_connects_to_the_swarm_without_a_chain(checkpoint, stack, monkeypatch):
    calls = []

    class FakeManager:
        @classmethod
        def from_pretrained_args(cls, **kwargs):
            calls.append(kwargs)
            return LocalChain(stack)

    fake = types.ModuleType("corolla.client.sequence_manager")
    fake.RemoteSequenceManager = FakeManager
    monkeypatch.setitem(sys.modules, "corolla.client.sequence_manager", fake)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/Qm"], dtype="float32", request_timeout=5.0
    )
    (call,) = calls
    assert call["model_ref"] == str(checkpoint) and call["config"] is model.config
    assert call["initial_peers"] == ["/ip4/127.0.0.1/tcp/1/p2p/Qm"] and call["request_timeout"] == 5.0
    assert call["dht_prefix"] == checkpoint.name.replace(".", "-")
    assert model.generate(_prompts(), max_new_tokens=2).shape == (1, 9)


def test_generate_outside_a_session_must_say_how_long(model):
    """As in Petals: the session's size comes from max_new_tokens or max_length; without either, a clear error
    (inside a session, transformers' defaults apply)."""
    ids = _prompts(1, 5)
    with pytest.raises(ValueError, match="max_new_tokens or max_length"):
        model.generate(ids)
    assert model.generate(ids, max_length=8).shape == (1, 8)
    with model.inference_session(max_length=32):
        assert model.generate(ids).shape[1] > ids.shape[1]
