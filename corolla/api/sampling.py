"""What OpenAI's sampling options mean that transformers has no processor for. Pure tensor/text code.

- **Presence and frequency penalties** (`OpenAIPenaltyProcessor`) follow OpenAI's definition: for each
  token j, ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``, where
  ``count`` counts j among the tokens generated so far (not the prompt). transformers'
  ``repetition_penalty`` is a different, multiplicative rule over prompt and output, so it is not used.
  ``logit_bias`` is added in the same processor.
- **Logprobs** (`LogprobRecorder`): the last processor of the request's own list records the
  log-softmax of the scores it sees. transformers applies the request's processors before temperature
  and top-p, so logprobs are of the model's distribution after penalties and bias, before temperature:
  the same numbers whatever the temperature.
- **Stop strings** are matched on the decoded text (`find_stop`, `held_back`): the answer ends just
  before the first stop string, and a stream holds back a tail that could still turn into one, so a
  client never sees part of a stop string.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class OpenAIPenaltyProcessor(LogitsProcessor):
    def __init__(
        self,
        prompt_length: int,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
    ):
        self.prompt_length = prompt_length
        self.presence, self.frequency = presence_penalty, frequency_penalty
        self.logit_bias = dict(logit_bias or {})

    @property
    def active(self) -> bool:
        return bool(self.presence or self.frequency or self.logit_bias)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] and (self.presence or self.frequency):
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, generated.to(scores.device), torch.ones_like(generated, dtype=scores.dtype))
            scores -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias), device=scores.device)
            scores[:, ids] += torch.tensor(
                list(self.logit_bias.values()), dtype=scores.dtype, device=scores.device
            )
        return scores


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities [B, V] of the latest step; changes nothing."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text`` that ends at or after ``start``, or None.

    ``start`` is where new text begins: a match must reach into it, so earlier text is not rescanned.
    """
    best = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` are the start of some stop string (to hold back)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely token ids of one row [V] with their log-probabilities, best first."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]))
    return [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
