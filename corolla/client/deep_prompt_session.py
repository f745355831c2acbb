"""Inference sessions through the swarm with deep prompts: the steps over the prompt prefix carry them.

Deep prompts apply to cache positions ``[0, K)``; a step (or a replay chunk after a failover) that
covers any of them is sent as ``InferencePromptStep`` with the hop's blocks' prompts, every other step
as a plain ``InferenceStep``. Everything else (routing, deadlines, failover with replay) is
:class:`~corolla.client.inference_session.InferenceSession`'s.
"""

from __future__ import annotations

import torch

from corolla.client.inference_session import InferenceSession
from corolla.models.deep_prompts import prompt_overlap
from corolla.wire.messages import InferencePromptStep, InferenceStep


class DeepPromptInferenceSession(InferenceSession):
    """A swarm inference session whose steps over cache positions < K carry each hop's deep prompts."""

    def __init__(self, manager, max_length: int, deep_prompts: torch.Tensor):
        super().__init__(manager, max_length)
        self.deep_prompts = deep_prompts  # [num_blocks, 1, K, H]

    def _step_message(self, hop, offset: int, x, positions, mask):
        if prompt_overlap(self.deep_prompts.shape[2], offset, x.shape[1]) == 0:
            return InferenceStep(offset, x, positions, mask)
        prompts = self.deep_prompts[hop.start : hop.end].to(x.dtype).contiguous()
        return InferencePromptStep(offset, x, positions, mask, prompts)
