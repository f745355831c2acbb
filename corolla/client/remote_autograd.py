"""The swarm's forward over whole sequences, and ``loss.backward()`` back through the servers.

:func:`remote_forward` is ``RemoteSequenceManager.forward``: the one path for every forward over the
swarm, with or without gradients. When gradients are needed it runs :class:`RemoteBlocksFunction`, a
``torch.autograd.Function`` whose forward sends each span's inputs to a server (``TrainForwardRequest``)
and whose backward sends them again with the gradient of the span's output (``BackwardRequest``), from
the last span to the first. Without gradients the same chunks go out as ``ForwardRequest`` (or
``TrainForwardRequest`` when deep prompts or the client's own trainables ride along). Decisions:

- **Chunks.** The batch is split by rows into chunks that fit a message (a backward request carries
  inputs and gradients, so a quarter of ``max_message_bytes`` each) and hold at most
  :data:`CHUNK_TOKENS` tokens, and into at least :data:`PIPELINE_CHUNKS` chunks when it has the rows. Chunks
  run concurrently: while the second server of a chain computes one chunk, the first computes the next
  (a pipeline), and with replicas different chunks land on different servers.
- **Routing and retries.** Each hop is planned with ``make_route(..., mode="max_throughput")`` from
  the first block not yet computed, so load spreads over replicas. Every attempt goes through the
  client's one :class:`~corolla.client.failure_policy.FailurePolicy` (fatal errors such as a bad request
  propagate, others ban the server and count a retry). Backward goes to the server that ran the span's
  forward while it is usable; otherwise a new route is planned for the span, and when no single server
  covers it any more, its inner inputs are recomputed by a forward over the new route first. A backward
  request carries the span's inputs, so any replica can answer it and a retried step gives the same
  result; a forward with gradients names a random ``graph_id`` so that the server that ran it may keep its
  autograd graph and skip recomputing it in backward (an optimisation with the same result).
- **Deep prompts** ``[num_blocks, B or 1, K, H]`` for the blocks run travel with each span's requests
  (the span's slice); their gradients come back and are summed over chunks (batch 1) or
  concatenated (per-row prompts).
- **Extras** (:class:`~corolla.client.chain.ChainExtras`, e.g. a client's LoRA) name the adapter of every
  request, prepare each server before its request, and turn each backward's extra gradients into their
  parameters' gradients, summed over chunks and spans.
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from corolla.client.chain import NO_EXTRAS, ChainExtras
from corolla.client.failure_policy import blame
from corolla.wire.messages import (
    BackwardRequest,
    BackwardResponse,
    ForwardRequest,
    ForwardResponse,
    TrainForwardRequest,
)

if TYPE_CHECKING:
    from corolla.client.sequence_manager import RemoteSequenceManager

__all__ = ["CHUNK_TOKENS", "PIPELINE_CHUNKS", "RemoteBlocksFunction", "remote_forward"]

#: Most tokens (rows x sequence length) in one chunk of a training forward/backward.
CHUNK_TOKENS = 8192
#: A batch is split into at least this many chunks (when it has that many rows), so servers work in a pipeline.
PIPELINE_CHUNKS = 4


@dataclass
class _Call:
    """What every request of one forward (and its backward) shares."""

    manager: RemoteSequenceManager
    extras: ChainExtras
    adapter: str  # named in every request ("" = base model)
    route_adapter: str | None  # only servers announcing it (a served adapter), or None
    base: int  # the first block of the call: prompts are indexed from it
    grad: bool  # a backward will follow: requests are TrainForwardRequest with a graph_id


def remote_forward(
    manager: RemoteSequenceManager,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    end: int,
    prompts: torch.Tensor | None = None,
    extras: ChainExtras = NO_EXTRAS,
) -> torch.Tensor:
    """Blocks [start, end) over whole sequences, differentiable w.r.t. hidden, prompts and extras."""
    if prompts is not None and prompts.shape[0] != end - start:
        raise ValueError(f"got deep prompts for {prompts.shape[0]} blocks, running {end - start}")
    params = tuple(extras.parameters(start, end))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, prompts, *params))
    served = None if extras.adapter else manager.served_adapter()
    call = _Call(manager, extras, extras.adapter or served or "", served, start, grad)
    if grad:
        return RemoteBlocksFunction.apply(hidden, prompts, call, positions, attention_mask, start, end, *params)
    out, _ = manager.bridge.run(forward_chunks(call, hidden, positions, attention_mask, prompts, start, end))
    return out


class RemoteBlocksFunction(torch.autograd.Function):
    """``apply(hidden, prompts | None, call, positions, mask, start, end, *extra_params)`` -> hidden after
    blocks [start, end)."""

    @staticmethod
    def forward(ctx, hidden, prompts, call, positions, mask, start, end, *params):
        hidden, positions, mask = hidden.detach(), positions.detach(), mask.detach()
        prompts = None if prompts is None else prompts.detach()
        out, chunks = call.manager.bridge.run(forward_chunks(call, hidden, positions, mask, prompts, start, end))
        ctx.call, ctx.chunks, ctx.prompts, ctx.span = call, chunks, prompts, (start, end)
        ctx.hidden_dtype, ctx.num_params = hidden.dtype, len(params)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        call = ctx.call
        grad_hidden, grad_prompts, extra = call.manager.bridge.run(
            backward_chunks(call, ctx.chunks, grad_output.contiguous(), ctx.prompts)
        )
        params = call.extras.param_grads(extra, *ctx.span) if ctx.num_params else ()
        return (grad_hidden.to(ctx.hidden_dtype), grad_prompts, None, None, None, None, None, *params)


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
    prompts: torch.Tensor | None  # [end - start, rows or 1, K, H], blocks from the call's `base`
    spans: list[_Span]


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


async def forward_chunks(call: _Call, hidden, positions, mask, prompts, start: int, end: int):
    """The chunks' outputs, concatenated, and the chunks (what each span saw, for the backward)."""
    chunks = [
        _Chunk(rows, positions[rows], mask[rows], _prompts_rows(prompts, rows), [])
        for rows in _row_slices(hidden, call.manager.config.max_message_bytes)
    ]
    outputs = await _gather(_forward_span(call, hidden[c.rows], c, start, end, c.spans) for c in chunks)
    return (torch.cat(outputs) if len(outputs) > 1 else outputs[0]), chunks


async def _forward_span(call: _Call, x, chunk: _Chunk, start: int, end: int, spans: list[_Span]):
    """Blocks [start, end) over ``x``, hop by hop, appending each hop's inputs to ``spans``."""
    manager, block, dtype = call.manager, start, x.dtype

    async def attempt():
        hop = (await manager.make_route(block, end, mode="max_throughput", adapter=call.route_adapter))[0]
        graph_id, request = _forward_request(call, chunk, hop.start, hop.end, x)
        async with blame(hop.peer_id):
            await call.extras.before_call(manager, hop.peer_id, hop.start, hop.end)
            response = await call_peer(manager, hop.peer_id, request, ForwardResponse)
        return hop, graph_id, response

    while block < end:
        hop, graph_id, response = await manager.policy.retry(attempt, call.extras.recover)
        spans.append(_Span(hop.start, hop.end, x, hop.peer_id, graph_id, hop.peer_id))
        x, block = response.hidden.to(dtype), hop.end
    return x


def _forward_request(call: _Call, chunk: _Chunk, start: int, end: int, x):
    """(graph_id, request) of one span: a plain ``ForwardRequest`` unless training or trainables ride along."""
    prompts = _span_prompts(chunk.prompts, call.base, start, end)
    if not call.grad and prompts is None and call.extras is NO_EXTRAS:
        return b"", ForwardRequest(call.manager.model, start, end, x, chunk.positions, chunk.mask, call.adapter)
    graph_id = os.urandom(16) if call.grad else b""
    return graph_id, TrainForwardRequest(
        call.manager.model, start, end, x, chunk.positions, chunk.mask, prompts, graph_id=graph_id,
        adapter=call.adapter,
    )  # fmt: skip


async def backward_chunks(call: _Call, chunks: list[_Chunk], grad_output, prompts):
    """(grad of the chunks' inputs, grad of the deep prompts or None, extra grads summed over chunks)."""
    results = await _gather(_backward_chunk(call, c, grad_output[c.rows]) for c in chunks)
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


async def _backward_chunk(call: _Call, chunk: _Chunk, grad: torch.Tensor):
    grad_prompts = None if chunk.prompts is None else torch.zeros_like(chunk.prompts)
    extra: dict = {}
    todo = list(chunk.spans)
    while todo:
        span = todo.pop()
        attempt = functools.partial(_backward_span, call, chunk, span, grad)
        done = await call.manager.policy.retry(attempt, call.extras.recover)
        if done is None:  # no single usable server covers this span now: recompute its inner inputs
            inner: list[_Span] = []
            await _forward_span(call, span.inputs, chunk, span.start, span.end, inner)
            todo.extend(inner)
            continue
        response, span_grads = done
        grad = response.grad_hidden.to(grad.dtype)
        extra.update(span_grads)
        if grad_prompts is not None:
            base = call.base
            grad_prompts[span.start - base : span.end - base] += response.grad_prompts.to(grad_prompts.dtype)
    return grad, grad_prompts, extra


async def _backward_span(call: _Call, chunk: _Chunk, span: _Span, grad: torch.Tensor):
    """One attempt at a span's backward: (response, extra grads), or None if the span must be split."""
    manager = call.manager
    if span.peer is None or manager.policy.is_banned(span.peer):
        route = await manager.make_route(span.start, span.end, mode="max_throughput", adapter=call.route_adapter)
        if len(route) > 1:
            return None
        span.peer = route[0].peer_id
    peer, span.peer = span.peer, None  # until it answers
    request = BackwardRequest(
        manager.model, span.start, span.end, span.inputs, chunk.positions, chunk.mask,
        grad.to(span.inputs.dtype), _span_prompts(chunk.prompts, call.base, span.start, span.end),
        graph_id=span.graph_id if peer == span.graph_peer else b"", adapter=call.adapter,
    )  # fmt: skip
    async with blame(peer):
        await call.extras.before_call(manager, peer, span.start, span.end)
        response = await call_peer(manager, peer, request, BackwardResponse)
        _check_grads(response, request)
        span_grads = call.extras.span_grads(response, request)
    span.peer = peer
    return response, span_grads


def _check_grads(response: BackwardResponse, request: BackwardRequest) -> None:
    if response.grad_hidden.shape != request.hidden.shape or (
        request.prompts is not None
        and (response.grad_prompts is None or response.grad_prompts.shape != request.prompts.shape)
    ):
        raise ValueError("the server answered gradients of the wrong shape")


async def call_peer(manager: RemoteSequenceManager, peer: str, request, expected: type):
    """The one call site of the training path (tests wrap it to see where requests go)."""
    return await manager.transport.call(
        peer, request, expected, manager.config.request_timeout, max_bytes=manager.config.max_message_bytes
    )
