"""Speculative decoding (corolla.client.speculative): greedy outputs identical to plain generation, the sampling
rule's output distribution exactly the target's, rewinds that replay only accepted tokens after a failover."""

from __future__ import annotations

import pytest
import torch

from corolla.client.local_chain import LocalChain
from corolla.client.speculative import PromptLookupDrafter, verify_drafts
from corolla.models.stack import BlockStack

# a prompt that repeats itself, so that n-gram lookup has something to propose
PROMPT = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7, 8, 5, 6]])


@pytest.fixture(scope="module")
def models(local_models):
    model, reference, _ = local_models
    return model, reference


@pytest.mark.parametrize("option", ["prompt_lookup", "assistant"])
def test_greedy_speculation_is_token_identical(models, option):
    model, reference = models
    plain = model.generate(PROMPT, max_new_tokens=24, do_sample=False)
    assert torch.equal(plain, reference.generate(PROMPT, max_new_tokens=24, do_sample=False))
    if option == "prompt_lookup":
        fast = model.generate(PROMPT, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
    else:  # the reference itself as the assistant: every draft is right, so whole passes are accepted
        fast = model.generate(PROMPT, max_new_tokens=24, do_sample=False, assistant_model=reference)
    assert torch.equal(fast, plain)
    stats = model.speculation_stats
    assert stats["accepted"] > 0 and stats["passes"] < 24
    if option == "assistant":
        assert stats["accepted"] == stats["drafted"]


def test_speculation_inside_a_session_continues_the_history(models):
    model, _ = models
    plain = model.generate(PROMPT, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=64) as session:
        first = model.generate(
            PROMPT, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3, session=session
        )
        rest = model.generate(None, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3, session=session)
    assert torch.equal(first, plain[:, : PROMPT.shape[1] + 6])
    assert torch.equal(torch.cat([first, rest], 1), plain)  # the second call returns only the continuation


def test_an_eos_among_accepted_drafts_ends_the_answer(models):
    """The assistant is the model itself (every draft accepted), and the EOS is a token greedy decoding
    reaches mid-pass: the output stops there, exactly as plain generation does."""
    model, reference = models
    plain = model.generate(PROMPT, max_new_tokens=24, do_sample=False)
    eos = int(plain[0, PROMPT.shape[1] + 5])  # the sixth new token plays the end of sequence
    plain = model.generate(PROMPT, max_new_tokens=24, do_sample=False, eos_token_id=eos)
    fast = model.generate(PROMPT, max_new_tokens=24, do_sample=False, eos_token_id=eos, assistant_model=reference)
    assert torch.equal(fast, plain[:, : fast.shape[1]]) and int(fast[0, -1]) == eos
    assert fast.shape[1] <= PROMPT.shape[1] + 6


def test_drafts_never_overflow_the_session(models):
    """A session with room for exactly the new tokens: drafts are cut to what fits (nothing is refused)."""
    model, _ = models
    plain = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    with model.inference_session(max_length=PROMPT.shape[1] + 8) as session:
        out = model.generate(
            PROMPT, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=6, session=session
        )
    assert torch.equal(out, plain)


def test_unsupported_options_are_refused_by_name(models):
    model, _ = models
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        model.generate(PROMPT, max_new_tokens=4, prompt_lookup_num_tokens=3, repetition_penalty=1.3)
    with pytest.raises(NotImplementedError, match="batch of 2"):
        model.generate(PROMPT.repeat(2, 1), max_new_tokens=4, prompt_lookup_num_tokens=3)
    with pytest.raises(NotImplementedError, match="not_an_option"):
        model.generate(PROMPT, max_new_tokens=4, prompt_lookup_num_tokens=3, not_an_option=1)


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    drafter = PromptLookupDrafter(num_tokens=3, max_ngram=2)
    drafts, probs = drafter.draft(torch.tensor([[1, 2, 3, 4, 9, 1, 2]]), 5)
    assert drafts.tolist() == [3, 4, 9] and probs is None
    drafts, _ = drafter.draft(torch.tensor([[1, 2, 3, 4]]), 5)  # no earlier occurrence: no drafts
    assert drafts.tolist() == []


def _first_two(p, q, trials, seed):
    """Empirical joint law of (first token, second token or -1) that a pass emits; drafts are drawn from the
    draft distributions ``q`` [2, V] (one-hot rows: a deterministic drafter)."""
    generator = torch.Generator().manual_seed(seed)
    deterministic = bool(((q == 0) | (q == 1)).all())
    counts = torch.zeros(p.shape[1], p.shape[1] + 1)
    for _ in range(trials):
        drafts = torch.multinomial(q, 1, generator=generator)[:, 0]
        tokens, _ = verify_drafts(drafts, None if deterministic else q, p, True, generator)
        counts[tokens[0], tokens[1] if len(tokens) > 1 else -1] += 1
    return counts / trials


@pytest.mark.parametrize("draft_kind", ["deterministic", "sampled"])
def test_sampled_verification_leaves_the_distribution_unchanged(draft_kind):
    """On a 4-token vocabulary, against the exact law: P(first = x) = p0(x), and a second token exists when
    the first draft was accepted, which happens with probability min(q0(x), p0(x)), then follows p1. A biased
    rule (accepting drafts too often, sampling the residual wrong) is off by far more than the 0.015 allowed
    (over 4 standard deviations at 20000 trials)."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]])
    if draft_kind == "deterministic":  # prompt lookup: the drafts are fixed, q is one-hot
        q = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    else:
        q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.2, 0.2, 0.2, 0.4]])
    law = _first_two(p, q, trials=20000, seed=0)
    torch.testing.assert_close(law.sum(1), p[0], atol=0.015, rtol=0)
    accepted = torch.minimum(q[0], p[0])
    torch.testing.assert_close(law[:, :4], accepted[:, None] * p[1][None, :], atol=0.015, rtol=0)


def test_greedy_verification_accepts_the_matching_prefix():
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    assert verify_drafts(torch.tensor([1, 2]), None, logits, False) == ([1, 2, 0], 2)
    assert verify_drafts(torch.tensor([1, 0]), None, logits, False) == ([1, 2], 1)
    assert verify_drafts(torch.tensor([2, 2]), None, logits, False) == ([1], 0)


def test_a_failover_after_a_rewind_replays_only_accepted_tokens(make_swarm):
    swarm = make_swarm()
    swarm.add_server("a", 0, 4, latency=0.001)
    swarm.add_server("b", 4, 8, latency=0.001)
    swarm.add_server("b2", 4, 8, latency=0.01)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(1, 10, 64, generator=g)
    wrong = torch.randn(1, 3, 64, generator=g)  # rejected drafts
    positions = torch.arange(10)[None]
    mask = torch.ones(1, 10, dtype=torch.bool)
    with swarm.manager.open_session(max_length=16) as session:
        first = session.step(hidden[:, :4], positions[:, :4], mask[:, :4])
        session.step(
            torch.cat([hidden[:, 4:5], wrong], dim=1), positions[:, 4:8], mask[:, 4:8]
        )  # one accepted token, three rejected
        session.rewind(5)
        assert session.position == 5 and all(torch.cat(h.history, 1).shape[1] == 5 for h in session._hops)
        swarm.kill("b")  # the replacement gets the five accepted tokens only
        rest = session.step(hidden[:, 5:], positions[:, 5:], mask[:, 5:])
        assert [h.peer_id for h in session.route] == ["a", "b2"] and session.failovers == 1
    expected = swarm.reference()(hidden, positions, mask)
    torch.testing.assert_close(first, expected[:, :4], atol=1e-5, rtol=0)
    torch.testing.assert_close(rest, expected[:, 5:], atol=1e-5, rtol=0)


def test_petals_speculative_classes(tiny_llama, models):
    """`AutoDistributedSpeculativeModel.from_pretrained(..., small_model=M)`: greedy generate drafts with M and
    gives plain generation's tokens (Petals' class names and options)."""
    from corolla import AutoDistributedSpeculativeModel

    model, reference = models
    stack = BlockStack.load(
        str(tiny_llama), 0, reference.config.num_hidden_layers, dtype=torch.float32, progress=False
    )
    fast = AutoDistributedSpeculativeModel.from_pretrained(
        str(tiny_llama), chain=LocalChain(stack), small_model=reference
    )
    assert type(fast).__name__ == "DistributedLlamaForSpeculativeGeneration"
    plain = model.generate(PROMPT, max_new_tokens=16, do_sample=False)
    out = fast.generate(PROMPT, max_new_tokens=16, do_sample=False, speculative_inference_iteration_size=4)
    assert torch.equal(out, plain)
    assert fast.speculation_stats["passes"] < 16 and fast.speculation_stats["accepted"] > 0
