"""Speculative decoding through the chain: draft k tokens locally, verify them in one pass over every server.

Over the internet a token costs at least the chain's round trips; verifying k drafted tokens costs about the
same (k + 1 positions per hop instead of one), so every accepted draft is a token for free. The options are
transformers' own assisted-generation ones on ``generate``:

- ``prompt_lookup_num_tokens=K``: drafts are the K tokens that followed the latest earlier occurrence of the
  sequence's last n-gram (n from ``max_matching_ngram_size``, default 2, down to 1). No extra model; it shines
  when the answer repeats or edits its context (summaries, code edits, quoting).
- ``assistant_model=M``: a small local causal LM sharing the tokenizer drafts ``num_assistant_tokens`` tokens
  (the ``heuristic`` schedule adapts that number as transformers does), with its own KV cache.

transformers' assisted decoding needs a croppable local KV cache, which a swarm client does not have (the
caches are on the servers), so the loop is corolla's: each pass sends the pending token and the drafts as one
step, takes the chain's logits for the k + 1 positions, keeps the drafts the verification rule accepts plus
one token chosen at the first rejection (or after the last draft), and rewinds the session to the accepted
length (the servers overwrite the rejected positions on the next step; a failover replays only accepted
tokens). Results do not change:

- **Greedy**: a draft is accepted while it equals the argmax; the output is token-identical to plain greedy
  generation (and hence to transformers on the same weights).
- **Sampling**: the rule of Leviathan et al. / Chen et al. (2023): accept draft x with probability
  min(1, p(x) / q(x)), else sample from max(p - q, 0) renormalised; a prompt-lookup draft is deterministic
  (q is one-hot). The output distribution is exactly p's (tested on a tiny vocabulary against the exact one).
  p is the target's distribution after temperature, top-k, top-p and min-p; other logits processors
  (repetition penalties, banned words, ...) are refused by name while speculating.

Batch size 1 without padding, as transformers' assisted generation; refused otherwise.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

if TYPE_CHECKING:
    from corolla.client.generation import GenerationSession

__all__ = ["AssistantDrafter", "Drafter", "PromptLookupDrafter", "speculative_generate", "verify_drafts"]

#: generation options that change the distribution through processors this loop does not apply, with the
#: value that means "off"
_REFUSED = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None,
    "min_length": 0, "min_new_tokens": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "sequence_bias": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "num_return_sequences": 1, "num_beams": 1, "return_dict_in_generate": False, "output_scores": False,
    "output_logits": False, "stop_strings": None, "guidance_scale": None, "top_h": None,
}  # fmt: skip


class Drafter(ABC):
    """Proposes tokens that may continue a sequence."""

    @abstractmethod
    def draft(self, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to ``k`` tokens [d] continuing ``ids`` [1, N], with the distributions they were drawn from
        [d, V] (None: chosen deterministically, q is one-hot)."""

    def adapt(self, drafted: int, accepted: int) -> None:  # noqa: B027 - optional hook
        """Told after each pass how many drafts were accepted."""


class PromptLookupDrafter(Drafter):
    """Drafts what followed the latest earlier occurrence of the sequence's last n-gram (n-gram lookup)."""

    def __init__(self, num_tokens: int, max_ngram: int = 2):
        if num_tokens < 1 or max_ngram < 1:
            raise ValueError("prompt_lookup_num_tokens and max_matching_ngram_size must be at least 1")
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def draft(self, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        seq = ids[0].tolist()
        k = min(k, self.num_tokens)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            for start in range(len(seq) - n - 1, -1, -1):
                if seq[start : start + n] == tail:
                    follow = seq[start + n : start + n + k]
                    return torch.tensor(follow, dtype=torch.long), None
        return torch.empty(0, dtype=torch.long), None


class AssistantDrafter(Drafter):
    """Drafts with a small local causal LM (same tokenizer), greedy or sampled with the target's warpers."""

    def __init__(self, model, config: GenerationConfig, warpers: LogitsProcessorList, generator=None):
        self.model, self.warpers, self.generator = model.eval(), warpers, generator
        self.do_sample = bool(config.do_sample)
        self.num_tokens = max(1, int(config.num_assistant_tokens or 5))
        self.schedule = config.num_assistant_tokens_schedule or "constant"
        self.cache, self.seen = None, None  # the assistant's cache holds ``seen`` [1, M]
        # transformers 5 names the forward's cache argument ``cache`` (``past_key_values`` before)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def draft(self, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        from transformers import DynamicCache

        k = min(k, self.num_tokens)
        if k < 1:
            return torch.empty(0, dtype=torch.long), None
        keep = 0
        if self.seen is not None:  # the longest common prefix with what the cache holds (minus the last token)
            n = min(self.seen.shape[1], ids.shape[1] - 1)
            diff = (self.seen[0, :n] != ids[0, :n]).nonzero()
            keep = int(diff[0]) if len(diff) else n
        if self.cache is None:
            self.cache = DynamicCache()
        surplus = self.cache.get_seq_length() - keep
        if surplus > 0:
            self.cache.crop(-surplus)  # a negative count removes that many tokens (every transformers version)
        x, tokens, probs = ids[:, keep:], [], []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for _ in range(k):
                cache = {self._cache_arg: self.cache}
                logits = self.model(input_ids=x.to(device), use_cache=True, **cache).logits
                scores = logits[:, -1].float().cpu()
                if self.do_sample:
                    p = torch.softmax(self.warpers(ids, scores), dim=-1)[0]
                    token = torch.multinomial(p, 1, generator=self.generator)
                    probs.append(p)
                else:
                    token = scores[0].argmax(-1, keepdim=True)
                tokens.append(token)
                x = token.view(1, 1)
        drafted = torch.cat(tokens)
        self.seen = torch.cat([ids, drafted[None, :-1]], dim=1)
        return drafted, (torch.stack(probs) if probs else None)

    def adapt(self, drafted: int, accepted: int) -> None:
        if self.schedule == "heuristic" and drafted:  # as transformers: +2 when all were accepted, else -1
            self.num_tokens = self.num_tokens + 2 if accepted == drafted else max(1, self.num_tokens - 1)


def verify_drafts(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target: torch.Tensor,
    do_sample: bool,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """The tokens a pass yields: accepted drafts, then one more. ``target`` [d + 1, V] is the chain's logits
    (greedy) or its probabilities after warping (sampling) at the pending token and each draft."""
    d = drafts.shape[0]
    if not do_sample:
        best = target.argmax(-1)
        accepted = 0
        while accepted < d and int(drafts[accepted]) == int(best[accepted]):
            accepted += 1
        return [*drafts[:accepted].tolist(), int(best[accepted])], accepted
    for i in range(d):
        x = int(drafts[i])
        q = draft_probs[i] if draft_probs is not None else torch.nn.functional.one_hot(drafts[i], target.shape[-1])
        q = q.to(target.dtype)
        if float(q[x]) > 0 and torch.rand((), generator=generator) < min(1.0, float(target[i, x] / q[x])):
            continue
        residual = (target[i] - q).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q: any draft would have been accepted; sample p itself
            residual = target[i]
        token = int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
        return [*drafts[:i].tolist(), token], i
    return [*drafts.tolist(), int(torch.multinomial(target[d], 1, generator=generator))], d


def warpers_for(config: GenerationConfig) -> LogitsProcessorList:
    """transformers' own warpers for the sampling options this loop supports."""
    warpers = LogitsProcessorList()
    if not config.do_sample:
        return warpers
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    if config.min_p:
        warpers.append(MinPLogitsWarper(config.min_p))
    return warpers


def check_supported(config: GenerationConfig, batch: int, attention_mask: torch.Tensor | None) -> None:
    for name, off in _REFUSED.items():
        value = getattr(config, name, off)
        if value is not None and value != off and not (off is None and not value):
            raise NotImplementedError(f"{name}={value!r} is not supported with speculative decoding")
    if batch != 1:
        raise NotImplementedError(f"speculative decoding takes one sequence, got a batch of {batch}")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise NotImplementedError("speculative decoding takes a sequence without padding")


def speculative_generate(
    model, session: GenerationSession, input_ids: torch.Tensor, config: GenerationConfig, drafter: Drafter,
    *, max_new_tokens: int, streamer=None, generator: torch.Generator | None = None, stats: dict | None = None,
) -> torch.Tensor:  # fmt: skip
    """Generate up to ``max_new_tokens`` after ``input_ids`` [1, N] (the whole history) in ``session``;
    returns [1, N + new]. ``stats`` (if given) gets passes, drafted and accepted counts."""
    warpers = warpers_for(config)
    eos = config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    ids = input_ids.cpu()
    if streamer is not None:
        streamer.put(ids)
    counts = stats if stats is not None else {}
    counts.update(passes=0, drafted=0, accepted=0)
    new = 0
    try:
        while new < max_new_tokens:
            room = min(max_new_tokens - new - 1, session.max_length - ids.shape[1])
            drafts, draft_probs = (
                drafter.draft(ids, room) if room > 0 else (torch.empty(0, dtype=torch.long), None)
            )
            drafts = drafts[:room]
            draft_probs = None if draft_probs is None else draft_probs[: drafts.shape[0]]
            candidate = torch.cat([ids, drafts[None]], dim=1)
            with model._using_session(session, full_history=True):
                logits = model(input_ids=candidate).logits[0, -(drafts.shape[0] + 1) :].float()
            if config.do_sample:
                target = torch.softmax(warpers(candidate, logits), dim=-1)
            else:
                target = logits
            tokens, accepted = verify_drafts(drafts, draft_probs, target, bool(config.do_sample), generator)
            drafter.adapt(drafts.shape[0], accepted)
            counts["passes"] += 1
            counts["drafted"] += drafts.shape[0]
            counts["accepted"] += accepted
            for i, token in enumerate(tokens):
                if token in eos:
                    tokens = tokens[: i + 1]
                    break
            # the caches keep the accepted drafts that are kept (an EOS may have cut them); the last token is
            # pending: it goes out first in the next pass
            session.rewind(ids.shape[1] + min(accepted, len(tokens) - 1))
            ids = torch.cat([ids, torch.tensor([tokens])], dim=1)
            session.record_output(ids)
            new += len(tokens)
            if streamer is not None:
                for token in tokens:
                    streamer.put(torch.tensor([token]))
            if tokens[-1] in eos:
                break
    finally:
        if streamer is not None:
            streamer.end()
    return ids
