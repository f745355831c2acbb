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
        with pytest.raises(ValueError, match="row indices"):  # beam reordering works; bad indices are refused
            session.step(hidden[:, :1], hypo_ids=torch.tensor([1]))
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


def test_petals_client_options_work_under_their_names_or_are_refused_by_name():
    from corolla.client.config import client_config

    assert client_config(use_server_to_server=False).push is False  # Petals' name for server-to-server pushes
    assert client_config(show_route="inference").show_route is True
    with pytest.raises(TypeError, match="daemon_startup_timeout"):
        client_config(daemon_startup_timeout=5)
    with pytest.raises(TypeError, match="max_pinged"):
        client_config(max_pinged=3)
    with pytest.raises(TypeError, match="unknown client options: cache_dir"):
        client_config(cache_dir="/tmp")
    with pytest.raises(TypeError, match="not both"):
        client_config(push=True, use_server_to_server=False)


def test_auto_distributed_config_refuses_unknown_options_and_stays_serializable(tiny_llama):
    import json

    from corolla import AutoDistributedConfig

    config = AutoDistributedConfig.from_pretrained(
        str(tiny_llama), initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmX"], blocked_servers=["QmA"]
    )
    assert config.blocked_servers == ["QmA"] and config.initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]
    json.loads(config.to_json_string())  # repr(config) works: no tuples or sets on it
    with pytest.raises(TypeError, match="connect_timeout"):
        AutoDistributedConfig.from_pretrained(str(tiny_llama), connect_timeout=5)


def test_petals_sequence_manager_form_checks_its_arguments(tiny_llama):
    from corolla import AutoDistributedConfig, RemoteSequenceManager
    from corolla.client.distributed_config import petals_manager_args

    config = AutoDistributedConfig.from_pretrained(str(tiny_llama), initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmX"])
    uids = [f"{config.dht_prefix}.{i}" for i in range(config.num_hidden_layers)]
    args = petals_manager_args(config, uids)
    assert args["dht_prefix"] == config.dht_prefix and args["initial_peers"] == config.initial_peers
    assert "initial_peers" not in args["options"] and "dht_prefix" not in args["options"]
    with pytest.raises(ValueError, match="every block of the model"):
        petals_manager_args(config, uids[3:6])
    with pytest.raises(NotImplementedError, match="state="):
        petals_manager_args(config, uids, state=object())

    class WithRpcHooks(RemoteSequenceManager):  # Petals' test_remote_sequential.py does this
        def get_request_metadata(self, protocol, *args, **kwargs):
            return {}

    with pytest.raises(NotImplementedError, match="get_request_metadata would be ignored"):
        WithRpcHooks(config, uids)


def test_options_a_remote_model_cannot_honour_are_refused_by_name(models, tiny_llama):
    from corolla import AutoDistributedModelForCausalLM
    from corolla.client.local_chain import LocalChain

    model, _, stack = models
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(3))
    with pytest.raises(NotImplementedError, match="output_hidden_states"):
        model.generate(ids, max_new_tokens=2, return_dict_in_generate=True, output_hidden_states=True)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(NotImplementedError, match="past_key_values"):
        model(ids, past_key_values=object())
    with pytest.raises(NotImplementedError, match="past_key_values: the caches live on the servers"):
        model.generate(ids, max_new_tokens=2, past_key_values=object())
    with pytest.raises(TypeError, match="unexpected forward options: bogus"):
        model(ids, bogus=1)
    with pytest.raises(ValueError, match="device_map='cuda'"):
        AutoDistributedModelForCausalLM.from_pretrained(
            str(tiny_llama), chain=LocalChain(stack), device_map="cuda"
        )


def test_use_session_makes_a_session_the_active_one(models):
    model, reference, _ = models
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    session = model.inference_session(max_length=16)
    with model.use_session(session):
        assert model.active_session is session
        first = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.active_session is None
    with model.use_session(session):
        second = model.generate(None, max_new_tokens=2, do_sample=False)
    session.close()
    expected = reference.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(torch.cat([first, second], 1), expected)


def test_bloom_word_embeddings_are_petals_layout(tmp_path):
    """Petals scripts apply word_embeddings_layernorm(word_embeddings(ids)); corolla's BLOOM embed_tokens already
    includes that norm, so word_embeddings is the bare lookup (the same weight) and the sequence matches."""
    from tiny_models import CONFIGS, make_checkpoint

    from corolla import AutoDistributedModelForCausalLM
    from corolla.client.local_chain import LocalChain
    from corolla.models.stack import BlockStack

    make_checkpoint(CONFIGS["bloom"](), tmp_path / "bloom")
    stack = BlockStack.load(str(tmp_path / "bloom"), 0, 4, dtype=torch.float32, progress=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tmp_path / "bloom"), chain=LocalChain(stack))
    ids = torch.tensor([[5, 9, 17]])
    petals_way = model.transformer.word_embeddings_layernorm(model.transformer.word_embeddings(ids))
    torch.testing.assert_close(petals_way, model.model.embed_tokens(ids), rtol=0, atol=0)
    assert model.transformer.word_embeddings.weight is model.model.embed_tokens.weight
