"""Client-side generation sessions: the token history of one conversation on top of a `ChainSession`.

A `ChainSession` (the swarm's, or `LocalChain`'s) owns the server-side KV caches and knows only how
many tokens they hold (`position`). A `GenerationSession` adds what the HF-compatible model needs to
drive it from transformers' `generate`:

- **The token history.** `input_ids` / `attention_mask` hold every token of the conversation known so
  far, including the last generated token, which is sampled but not yet sent to the chain (it is sent
  as the first token of the next step). Multi-turn generation concatenates this history with the new
  tokens, so transformers sees exactly the sequence a one-shot call would see. Generated tokens count as
  real (mask 1) even when they equal the pad id, as in transformers' own loop; a later turn's tokens
  given without an `attention_mask` are all real (transformers guesses padding from pad ids only when
  it has no mask at all, i.e. for a first prompt).
- **Which tokens are new.** transformers' generate runs with `use_cache=False` and passes the full
  sequence at every step; only the tokens past `position` go to the chain. A user stepping by hand may
  instead pass only the new tokens. `prepare_step` tells the two apart: the input is the full history
  when its first `position` ids equal the ids already sent (or when the caller says so); otherwise the
  given tokens are new and any pending (known but unsent) tokens are sent before them.
- **Position ids.** When the caller gives none, a real token's position is the number of real tokens
  before it in its row and padding gets 0: the rule transformers' generate uses
  (`attention_mask.cumsum(-1) - 1`, padding filled with 0). Without padding this is `position + i`, the
  positions `LlamaModel.forward` gives a cached step, so hand-stepped and generated sessions agree.
- **Beam search.** transformers' beam search keeps the best hypotheses by reordering (and duplicating) rows:
  a full sequence whose rows' sent prefixes are rows of the history, in another order, is a reordering.
  The step then carries `hypo_ids` (for each row, the history row it continues; rows with identical token
  prefixes and masks have identical caches, so any of them serves), every server reorders its cache rows
  before computing, and the history is reordered to match.
- **Overflow** of `max_length` raises `SessionLengthError` before anything is sent.

`next_positions` is pure and unit-tested through the model tests. A session is activated on its owner
model with `with session:` (closing it on exit); sessions are per thread (see `model.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from corolla.client.chain import ChainSession
from corolla.wire.errors import SessionLengthError

__all__ = ["GenerationSession", "PreparedStep", "SessionLengthError", "next_positions"]


def next_positions(prior_mask: torch.Tensor | None, new_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, T] of new tokens: real tokens before them in the row; padding gets 0."""
    new_mask = new_mask.long()
    base = 0 if prior_mask is None else prior_mask.long().sum(-1, keepdim=True)
    positions = base + new_mask.cumsum(-1) - 1
    return positions.masked_fill(new_mask == 0, 0)


@dataclass
class PreparedStep:
    """What one forward sends to the chain: T new tokens, and how many trailing outputs the caller wants."""

    hidden: torch.Tensor  # [B, T, H]
    positions: torch.Tensor  # [B, T] int64
    mask: torch.Tensor  # [B, T] long, 1 = real token
    ids: torch.Tensor | None  # [B, T] when the new tokens' ids are known
    num_outputs: int  # logits are returned for the last `num_outputs` of the T tokens
    #: [B] beam search: the cached row each row continues (the caches are reordered before the step)
    hypo_ids: torch.Tensor | None = None


class GenerationSession:
    """Token history + a `ChainSession`; a context manager that makes itself the owner's active session."""

    def __init__(self, chain_session: ChainSession, max_length: int, owner=None):
        self.chain_session, self.max_length, self.owner = chain_session, max_length, owner
        self.input_ids: torch.Tensor | None = None  # [B, N] every known token (None if fed embeddings)
        self.attention_mask: torch.Tensor | None = None  # [B, N] long
        self.length = 0  # N, known tokens (sent + pending)
        self.full_history: bool | None = None  # set by generate: inputs are always the whole sequence
        self.closed = False

    @property
    def position(self) -> int:
        """Tokens held by the server-side caches (the offset of the next step)."""
        return self.chain_session.position

    @position.setter
    def position(self, value: int) -> None:
        """Rewind to ``value`` tokens (Petals' ``session.position = n``): later tokens are forgotten."""
        self.rewind(value)

    @property
    def last_token_id(self) -> torch.Tensor | None:
        """[B, 1]: the conversation's last token (generated, not sent yet), as Petals' sessions keep it."""
        return None if self.input_ids is None or self.length == 0 else self.input_ids[:, -1:]

    @property
    def batch_size(self) -> int | None:
        return None if self.attention_mask is None else self.attention_mask.shape[0]

    def __enter__(self) -> GenerationSession:
        if self.owner is not None:
            self.owner.activate_session(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.owner is not None:
            self.owner.deactivate_session(self)
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.chain_session.close()

    def history_with(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The conversation so far followed by `input_ids` (new tokens only), with its attention mask."""
        if self.length == 0:
            return input_ids, attention_mask
        if self.input_ids is None:
            raise ValueError("this session was fed embeddings, so its token history is unknown; use forward()")
        if input_ids is None:
            return self.input_ids, self.attention_mask
        self._check_batch(input_ids.shape[0])
        new_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        if new_mask.shape[1] == self.length + input_ids.shape[1]:  # HF convention: mask covers the history too
            new_mask = new_mask[:, self.length :]
        ids = torch.cat([self.input_ids.to(input_ids.device), input_ids], dim=1)
        return ids, torch.cat([self.attention_mask.to(new_mask.device), new_mask.long()], dim=1)

    def rewind(self, position: int) -> None:
        """Forget every token from ``position`` on, sent or pending (the chain's caches are overwritten by the
        next step)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind a session holding {self.position} tokens to {position}")
        self.chain_session.rewind(position)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :position] if position else None
        if self.input_ids is not None:
            self.input_ids = self.input_ids[:, :position] if position else None
        self.length = position

    def record_output(self, sequences: torch.Tensor) -> None:
        """After generate: `sequences` (history + generated) become the known tokens; the last one is pending.

        Tokens generated after a row finished are padding ids that transformers still attends to (its mask
        grows by ones), so the unsent tokens get mask 1 here too.
        """
        sequences = sequences.cpu()
        if self.attention_mask is None:
            mask = torch.ones_like(sequences)
        else:
            unsent = sequences.new_ones(sequences.shape[0], sequences.shape[1] - self.attention_mask.shape[1])
            mask = torch.cat([self.attention_mask, unsent], dim=1)
        self.input_ids, self.attention_mask, self.length = sequences, mask, sequences.shape[1]

    def prepare_step(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        full_history: bool | None = None,
    ) -> PreparedStep:
        """Select the tokens of this forward that the chain has not seen (see the module docstring)."""
        given = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]
        self._check_batch(input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0])
        is_full = self._is_full_history(input_ids, given) if full_history is None else full_history
        if is_full:
            return self._full_step(embed, input_ids, inputs_embeds, attention_mask, position_ids, given)
        return self._new_step(embed, input_ids, inputs_embeds, attention_mask, position_ids, given)

    def _is_full_history(self, input_ids: torch.Tensor | None, given: int) -> bool:
        sent = self.position
        if input_ids is None or self.input_ids is None or given <= sent:
            return sent == 0
        if torch.equal(input_ids[:, :sent].cpu(), self.input_ids[:, :sent]):
            return True
        return self._continued_rows(input_ids, None) is not None

    def _continued_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """For each row of ``input_ids``, a history row whose sent tokens (and mask) it starts with; None if
        some row starts with none of them."""
        sent = self.position
        new_ids, old_ids = input_ids[:, :sent].cpu(), self.input_ids[:, :sent]
        same = (new_ids[:, None, :] == old_ids[None, :, :]).all(-1)
        if attention_mask is not None and self.attention_mask is not None:
            new_mask, old_mask = attention_mask[:, :sent].cpu().long(), self.attention_mask[:, :sent].long()
            same &= (new_mask[:, None, :] == old_mask[None, :, :]).all(-1)
        if not bool(same.any(dim=1).all()):
            return None
        return same.long().argmax(dim=1)  # the first matching row

    def _full_step(self, embed, input_ids, inputs_embeds, attention_mask, position_ids, given) -> PreparedStep:
        sent, inputs = self.position, (input_ids if input_ids is not None else inputs_embeds)
        if given <= sent:
            raise ValueError(f"no new tokens: the session already holds {sent} tokens and got {given}")
        hypo_ids = None
        if sent and input_ids is not None and self.input_ids is not None:
            if not torch.equal(input_ids[:, :sent].cpu(), self.input_ids[:, :sent]):
                hypo_ids = self._continued_rows(input_ids, attention_mask)
                if hypo_ids is None:
                    raise RuntimeError(
                        "the sequence no longer starts with the tokens this session sent (a rewritten history?); "
                        "rewind the session (session.position = n) or open a new one"
                    )
        if attention_mask is None:
            attention_mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        mask = attention_mask[:, sent:].long()
        hidden = embed(input_ids[:, sent:]) if inputs_embeds is None else inputs_embeds[:, sent:]
        if position_ids is not None:
            positions = position_ids.expand(inputs.shape[0], -1)[:, sent:]
        else:
            positions = next_positions(attention_mask[:, :sent], mask)
        ids = None if input_ids is None else input_ids[:, sent:]
        return PreparedStep(hidden, positions, mask, ids, given - sent, hypo_ids)

    def _new_step(self, embed, input_ids, inputs_embeds, attention_mask, position_ids, given) -> PreparedStep:
        sent, inputs = self.position, (input_ids if input_ids is not None else inputs_embeds)
        pending = self.length - sent
        if pending and self.input_ids is None:
            raise ValueError("the session has pending tokens of unknown ids; pass the full history")
        if attention_mask is None:
            mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
        elif attention_mask.shape[1] in (given, self.length + given):  # new tokens, or HF's whole-history mask
            mask = attention_mask[:, -given:].long()
        else:
            raise ValueError(
                f"attention_mask of length {attention_mask.shape[1]} fits neither the {given} new tokens nor "
                f"the {self.length + given} tokens of the whole history"
            )
        hidden = embed(input_ids) if inputs_embeds is None else inputs_embeds
        ids = input_ids
        if pending:  # the last generated token was sampled but not sent yet: it goes first
            pending_ids = self.input_ids[:, sent:].to(inputs.device)
            hidden = torch.cat([embed(pending_ids), hidden], dim=1)
            mask = torch.cat([self.attention_mask[:, sent:].to(inputs.device), mask], dim=1)
            ids = None if input_ids is None else torch.cat([pending_ids, input_ids], dim=1)
        prior_mask = None if self.attention_mask is None else self.attention_mask[:, :sent].to(inputs.device)
        positions = next_positions(prior_mask, mask)
        if position_ids is not None:
            positions[:, pending:] = position_ids.expand(inputs.shape[0], -1)[:, -given:]
        return PreparedStep(hidden, positions, mask, ids, given)

    def step(self, prepared: PreparedStep) -> torch.Tensor:
        """Send the prepared tokens through the chain; returns the chain's output [B, T, H]."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        sent, tokens = self.position, prepared.hidden.shape[1]
        if sent + tokens > self.max_length:
            raise SessionLengthError(
                f"Maximum length exceeded: the inference session's max_length={self.max_length}, it holds {sent} "
                f"tokens and got {tokens} more; open it with a larger max_length"
            )
        out = self.chain_session.step(
            prepared.hidden.cpu(),
            prepared.positions.cpu().long(),
            prepared.mask.cpu().bool(),
            hypo_ids=prepared.hypo_ids,
        )
        if prepared.hypo_ids is not None:  # the history follows the caches' new row order
            if self.input_ids is not None:
                self.input_ids = self.input_ids[prepared.hypo_ids]
            self.attention_mask = self.attention_mask[prepared.hypo_ids]
        self._append(sent, prepared)
        return out.to(prepared.hidden.device)

    def _append(self, sent: int, prepared: PreparedStep) -> None:
        """The sent tokens are now the history; anything pending was sent with them."""
        mask = prepared.mask.cpu().long()
        prior_mask = None if self.attention_mask is None else self.attention_mask[:, :sent]
        prior_ids = None if self.input_ids is None else self.input_ids[:, :sent]
        self.attention_mask = mask if not sent else torch.cat([prior_mask, mask], dim=1)
        if prepared.ids is None or (sent and prior_ids is None):
            self.input_ids = None
        else:
            ids = prepared.ids.cpu()
            self.input_ids = ids if not sent else torch.cat([prior_ids, ids], dim=1)
        self.length = self.attention_mask.shape[1]

    def _check_batch(self, batch: int) -> None:
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"this session holds a batch of {self.batch_size} sequences, got {batch}")
