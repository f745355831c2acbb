"""Tiny random checkpoints written by transformers' own `save_pretrained` (sharded safetensors + index).

Weights are re-drawn larger than transformers' init (std 0.02 makes attention nearly uniform and hides
bugs); norm weights are perturbed away from 1 so that a misplaced norm shows up.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, make_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    """(name, folder, transformers model) for each tiny config."""
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(CONFIGS[request.param](), path)
    return request.param, str(path), model


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory):
    """One GQA Llama checkpoint for loader tests: (folder, transformers model)."""
    path = tmp_path_factory.mktemp("llama-loader")
    model = make_checkpoint(CONFIGS["llama-gqa-headdim-llama3-tied"](), path, seed=1)
    return str(path), model
