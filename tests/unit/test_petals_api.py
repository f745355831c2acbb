"""The parts of Petals' client API that scripts use beyond generate: sessions over a slice of blocks, the raw
`step(hidden_states)` form, rewinding by setting `position`, `last_token_id`, and Petals' module paths."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def models(local_models):
    return local_models


def test_a_session_over_a_slice_of_blocks(models):
    model, _, stack = models
    hidden = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions, mask = torch.arange(6)[None], torch.ones(1, 6, dtype=torch.bool)
    expected = stack(hidden, positions, mask, None, 0, (2, 5))
    with model.transformer.h[2:5].inference_session(max_length=8) as session:
        first = session.step(hidden[:, :4])  # positions and mask are optional, as in Petals
        empty = session.step(hidden[:, :0])
        rest = session.step(hidden[:, 4:])
        assert empty.shape == (1, 0, model.config.hidden_size) and session.position == 6
        session.position = 4  # rewind: the next step overwrites from position 4
        again = session.step(hidden[:, 4:])
        with pytest.raises(NotImplementedError, match="hypo_ids"):
            session.step(hidden[:, :1], hypo_ids=torch.tensor([0]))
        with pytest.raises(ValueError, match="per-step prompts"):
            session.step(hidden[:, :1], prompts=torch.zeros(3, 1, 1, model.config.hidden_size))
    torch.testing.assert_close(torch.cat([first, rest], 1), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, expected[:, 4:], atol=1e-5, rtol=0)


def test_start_from_position_rewinds_before_the_step(models):
    model, _, stack = models
    hidden = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    expected = stack(hidden, torch.arange(5)[None], torch.ones(1, 5, dtype=torch.bool))
    with model.transformer.h.inference_session(max_length=8) as session:
        session.step(hidden)
        out = session.step(hidden[:, 3:], start_from_position=3)
    torch.testing.assert_close(out, expected[:, 3:], atol=1e-5, rtol=0)


def test_generation_sessions_rewind_and_know_their_last_token(models):
    model, reference, _ = models
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    with model.inference_session(max_length=32) as session:
        first = model.generate(ids, max_new_tokens=4, do_sample=False, session=session)
        assert torch.equal(session.last_token_id, first[:, -1:])
        session.position = 5  # keep 5 prompt tokens: the next call's inputs go at position 5
        assert session.last_token_id is not None and torch.equal(session.last_token_id, ids[:, 4:5])
        again = model.generate(ids[:, 5:], max_new_tokens=4, do_sample=False, session=session)
    expected = reference.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, expected)
    assert torch.equal(again, expected[:, 5:])  # the same continuation, computed again from position 5


def test_petals_module_paths_are_aliases(models):
    model, _, _ = models
    assert model.transformer is model.model
    assert model.transformer.h is model.model.layers
    assert model.transformer.word_embeddings is model.model.embed_tokens is model.get_input_embeddings()
    assert model.transformer.ln_f is model.model.norm
    assert isinstance(
        model.transformer.word_embeddings_layernorm, torch.nn.Identity
    )  # Llama has none, as in Petals
