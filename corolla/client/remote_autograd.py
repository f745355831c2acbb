"""Remote blocks under autograd: forward through the swarm, and ``loss.backward()`` back through it.

:func:`chain_forward` is what ``RemoteSequential`` calls. On the swarm, when gradients are needed, it
runs :class:`RemoteBlocksFunction`, a ``torch.autograd.Function`` whose forward sends each span's
inputs to a server (``TrainForwardRequest``) and whose backward sends them again with the gradient of
the span's output (``BackwardRequest``), from the last span to the first. Decisions:

- **Chunks.** The batch is split by rows into chunks that fit a message (a backward request carries
  inputs and gradients, so a quarter of ``max_message_bytes`` each) and hold at most
  :data:`CHUNK_TOKENS` tokens, and into at least :data:`PIPELINE_CHUNKS` chunks when it has the rows. Chunks
  run concurrently: while the second server of a chain computes one chunk, the first computes the next
  (a pipeline), and with replicas different chunks land on different servers.
- **Routing and retries.** Each hop is planned with ``make_route(..., mode="max_throughput")`` from
  the first block not yet computed, so load spreads over replicas. A failed span is banned through
  the manager's one failure policy (``note_failure``: fatal errors such as a bad request propagate,
  others count a retry) and retried on another server. Backward goes to the server that ran the
  span's forward while it is usable; otherwise a new route is planned for the span, and when no single
  server covers it any more, its inner inputs are recomputed by a forward over the new route first.
  A backward request carries the span's inputs, so any replica can answer it and a retried step gives the
  same result; the forward names a random ``graph_id`` so that the server that ran it may keep its autograd
  graph and skip recomputing it in backward (an optimisation with the same result).
- **Deep prompts** ``[num_blocks, B or 1, K, H]`` for the blocks run travel with each span's requests
  (the span's slice); their gradients come back and are summed over chunks (batch 1) or
  concatenated (per-row prompts).
- **In-process chains** (``LocalChain``, tests and references) run the same math locally with
  :func:`corolla.models.deep_prompts.run_blocks`, under ordinary autograd.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import torch

from corolla.models.deep_prompts import run_blocks
from corolla.wire.messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardResponse,
    TrainForwardRequest,
)

__all__ = ["CHUNK_TOKENS", "PIPELINE_CHUNKS", "RemoteBlocksFunction", "SpanExtras", "chain_forward"]

#: Most tokens (rows x sequence length) in one chunk of a training forward/backward.
CHUNK_TOKENS = 8192
#: A batch is split into at least this many chunks (when it has that many rows), so servers work in a pipeline.
PIPELINE_CHUNKS = 4


def chain_forward(
    chain: Any,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    end: int,
    prompts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocks [start, end) of ``chain`` over whole sequences, differentiable w.r.t. hidden and prompts."""
    if prompts is not None and prompts.shape[0] != end - start:
        raise ValueError(f"got deep prompts for {prompts.shape[0]} blocks, running {end - start}")
    if hasattr(chain, "make_route"):  # the swarm (RemoteSequenceManager)
        needs_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or (prompts is not None and prompts.requires_grad)
        )
        if needs_grad:
            return RemoteBlocksFunction.apply(hidden, prompts, chain, positions, attention_mask, start, end)
        if prompts is None:
            return chain.forward(hidden, positions, attention_mask, start=start, end=end)
        out, _ = chain.bridge.run(
            forward_chunks(chain, hidden, positions, attention_mask, prompts, start, end, keep_graphs=False)
        )
        return out
    if prompts is None:
        return chain.forward(hidden, positions, attention_mask, start=start, end=end)
    stack = getattr(chain, "stack", None)
    if stack is None:
        raise TypeError(f"{type(chain).__name__} cannot run deep prompts")
    # an in-process chain (LocalChain): the same math, under ordinary autograd
    return run_blocks(stack, (stack.start + start, stack.start + end), hidden, positions, attention_mask, prompts)


class RemoteBlocksFunction(torch.autograd.Function):
    """``apply(hidden, prompts | None, manager, positions, mask, start, end)`` -> hidden after blocks [start, end)."""

    @staticmethod
    def forward(ctx, hidden, prompts, manager, positions, mask, start, end):
        hidden, positions, mask = hidden.detach(), positions.detach(), mask.detach()
        prompts = None if prompts is None else prompts.detach()
        out, chunks = manager.bridge.run(forward_chunks(manager, hidden, positions, mask, prompts, start, end))
        ctx.manager, ctx.chunks, ctx.prompts, ctx.start = manager, chunks, prompts, start
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_prompts, _ = ctx.manager.bridge.run(
            backward_chunks(ctx.manager, ctx.chunks, grad_output.contiguous(), ctx.prompts, ctx.start)
        )
        return grad_hidden.to(ctx.hidden_dtype), grad_prompts, None, None, None, None, None


# ---- the async work, on the client's network loop --------------------------------------------------------


@dataclass
class _Span:
    """What one span of one chunk's forward saw: its inputs, and which server ran it."""

    start: int
    end: int
    inputs: torch.Tensor
    peer: str | None
    graph_id: bytes = b""  # the forward's id on ``graph_peer``, who may have kept its graph
    graph_peer: str | None = None


@dataclass
class _Chunk:
    rows: slice
    positions: torch.Tensor
    mask: torch.Tensor
    prompts: torch.Tensor | None  # [end - start, rows or 1, K, H], blocks from the chain's `start`
    spans: list[_Span]


class SpanExtras:
    """Per-span trainable tensors beyond deep prompts, e.g. a client's LoRA (``corolla.client.lora``).

    The base class adds nothing. A subclass names the ``adapter`` its requests use, prepares a server
    before a request (``before_call``: e.g. upload weights), may handle failures itself (``note_failure``),
    and checks and returns the extra gradients of a backward response (``span_grads``: a dict merged over
    spans and summed over chunks).
    """

    adapter: str = ""
    keep_graphs: bool = True

    async def before_call(self, manager, peer: str, start: int, end: int) -> None:
        pass

    def note_failure(self, manager, peer: str, error: BaseException, failures: int) -> None:
        manager.note_failure(peer, error, failures)

    def span_grads(self, response: BackwardResponse, request: BackwardRequest) -> dict:
        return {}


NO_EXTRAS = SpanExtras()


def _row_slices(hidden: torch.Tensor, max_bytes: int) -> list[slice]:
    """Rows per chunk: a backward request carries inputs and gradients, so a quarter of a message each, at
    most CHUNK_TOKENS tokens, and at least PIPELINE_CHUNKS chunks when the batch has the rows."""
    batch, tokens = hidden.shape[:2]
    row_bytes = max(1, hidden[0].numel() * hidden.element_size())
    rows = max(1, min(max_bytes // 4 // row_bytes, CHUNK_TOKENS // max(1, tokens), -(-batch // PIPELINE_CHUNKS)))
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]


def _prompts_rows(prompts: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if prompts is None or prompts.shape[1] == 1:
        return prompts
    return prompts[:, rows]


def _span_prompts(prompts: torch.Tensor | None, base: int, start: int, end: int) -> torch.Tensor | None:
    return None if prompts is None else prompts[start - base : end - base].contiguous()


async def _gather(coros) -> list:
    """Run ``coros`` concurrently; the first error cancels the rest and propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def forward_chunks(
    manager, hidden, positions, mask, prompts, start: int, end: int, keep_graphs: bool = True,
    extras: SpanExtras = NO_EXTRAS,
):  # fmt: skip
    chunks = [
        _Chunk(rows, positions[rows], mask[rows], _prompts_rows(prompts, rows), [])
        for rows in _row_slices(hidden, manager.config.max_message_bytes)
    ]
    keep_graphs = keep_graphs and extras.keep_graphs
    outputs = await _gather(
        _forward_span(manager, hidden[c.rows], c, start, start, end, c.spans, keep_graphs, extras) for c in chunks
    )
    return (torch.cat(outputs) if len(outputs) > 1 else outputs[0]), chunks


async def _forward_span(
    manager, x, chunk: _Chunk, base: int, start: int, end: int, spans: list[_Span], keep_graphs: bool = True,
    extras: SpanExtras = NO_EXTRAS,
):  # fmt: skip
    """Blocks [start, end) over ``x``, hop by hop, appending each hop's inputs to ``spans``."""
    block, failures, dtype = start, 0, x.dtype
    while block < end:
        hop = (await manager.make_route(block, end, mode="max_throughput"))[0]
        graph_id = os.urandom(16) if keep_graphs else b""
        request = TrainForwardRequest(
            manager.model, hop.start, hop.end, x, chunk.positions, chunk.mask,
            _span_prompts(chunk.prompts, base, hop.start, hop.end), graph_id=graph_id, adapter=extras.adapter,
        )  # fmt: skip
        try:
            await extras.before_call(manager, hop.peer_id, hop.start, hop.end)
            response = await call_peer(manager, hop.peer_id, request, ForwardResponse)
        except Exception as e:
            failures += 1
            extras.note_failure(manager, hop.peer_id, e, failures)
            continue
        spans.append(_Span(hop.start, hop.end, x, hop.peer_id, graph_id, hop.peer_id))
        x, block = response.hidden.to(dtype), hop.end
    return x


async def backward_chunks(
    manager, chunks: list[_Chunk], grad_output, prompts, base: int, extras: SpanExtras = NO_EXTRAS
):
    """(grad of the chunks' inputs, grad of the deep prompts or None, extra grads summed over chunks)."""
    results = await _gather(_backward_chunk(manager, c, grad_output[c.rows], base, extras) for c in chunks)
    grad_hidden = torch.cat([g for g, _, _ in results]) if len(results) > 1 else results[0][0]
    extra: dict = {}
    for _, _, grads in results:
        for key, value in grads.items():
            extra[key] = tuple(a + b for a, b in zip(extra[key], value)) if key in extra else value
    if prompts is None:
        return grad_hidden, None, extra
    grads = [gp for _, gp, _ in results]
    grad_prompts = sum(grads[1:], grads[0]) if prompts.shape[1] == 1 else torch.cat(grads, dim=1)
    return grad_hidden, grad_prompts, extra


async def _backward_chunk(manager, chunk: _Chunk, grad: torch.Tensor, base: int, extras: SpanExtras = NO_EXTRAS):
    grad_prompts = None if chunk.prompts is None else torch.zeros_like(chunk.prompts)
    extra: dict = {}
    todo, failures = list(chunk.spans), 0
    while todo:
        span = todo.pop()
        if span.peer is None or manager.is_banned(span.peer):
            route = await manager.make_route(span.start, span.end, mode="max_throughput")
            if len(route) > 1:  # no single usable server covers this span now: recompute its inner inputs
                inner: list[_Span] = []
                await _forward_span(
                    manager, span.inputs, chunk, base, span.start, span.end, inner, extras.keep_graphs, extras
                )
                todo.extend(inner)
                continue
            span.peer = route[0].peer_id
        request = BackwardRequest(
            manager.model, span.start, span.end, span.inputs, chunk.positions, chunk.mask,
            grad.to(span.inputs.dtype), _span_prompts(chunk.prompts, base, span.start, span.end),
            graph_id=span.graph_id if span.peer == span.graph_peer else b"", adapter=extras.adapter,
        )  # fmt: skip
        try:
            await extras.before_call(manager, span.peer, span.start, span.end)
            response = await call_peer(manager, span.peer, request, BackwardResponse)
            _check_grads(response, request)
            span_grads = extras.span_grads(response, request)
        except Exception as e:
            failures += 1
            extras.note_failure(manager, span.peer, e, failures)
            span.peer = None
            todo.append(span)
            continue
        grad = response.grad_hidden.to(grad.dtype)
        extra.update(span_grads)
        if grad_prompts is not None:
            grad_prompts[span.start - base : span.end - base] += response.grad_prompts.to(grad_prompts.dtype)
    return grad, grad_prompts, extra


def _check_grads(response: BackwardResponse, request: BackwardRequest) -> None:
    if response.grad_hidden.shape != request.hidden.shape or (
        request.prompts is not None
        and (response.grad_prompts is None or response.grad_prompts.shape != request.prompts.shape)
    ):
        raise ValueError("the server answered gradients of the wrong shape")


async def call_peer(manager, peer: str, request, expected: type):
    from corolla.swarm.transport import call  # the network stack loads only with a swarm chain

    return await call(
        manager.node.p2p, peer, request, expected, manager.config.request_timeout,
        max_bytes=manager.config.max_message_bytes,
    )  # fmt: skip
