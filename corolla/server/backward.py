"""Training calls on a server: forward with trainable extras, and backward, over hosted blocks.

A client fine-tunes a model whose blocks it does not hold: it sends each span's inputs forward, and on
``loss.backward()`` sends the same inputs back with the gradient of the span's output. Decisions:

- **Self-contained backward.** The backward request carries the span's inputs again, so any replica of
  the span can answer it, which is what lets the client retry a failed span elsewhere: the server
  recomputes the span's forward under autograd (activation recomputation, as in Petals), then takes
  ``torch.autograd.grad`` of it. As an optimisation, a forward that names a ``graph_id`` is run under
  autograd and its graph kept (bounded, expiring: :mod:`corolla.server.saved_graphs`); the backward
  naming the same id from the same client, with the same inputs, uses it instead of recomputing. With a
  client's own trainables (its LoRA) the kept graph has them as leaves too, keyed by the adapter's name
  (its version) as well.
- **Frozen weights.** The hosted blocks' parameters have ``requires_grad=False`` (set by the backend);
  gradients are taken only with respect to the request's tensors, so nothing accumulates into or
  updates a weight, whatever a client sends.
- **Extensible trainables.** :meth:`TrainingBackend.span_backward` takes the span's inputs, optional
  deep prompts, and any other per-block trainable tensors (``extra``) together with a context manager
  factory that makes the blocks use them (client-owned LoRA plugs in here); it returns the gradients of
  all of them.
- **Bounded and checked.** Batch and length limits as for inference, tensors checked against the
  hosted model before any compute (:class:`BadRequestError` naming what is wrong), messages bounded by
  ``max_message_bytes`` by the framing. Training jobs run at forward priority: inference steps go first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from corolla.models.deep_prompts import run_blocks
from corolla.server.backend import BlockBackend
from corolla.server.checks import check_inputs, check_prompts, check_range
from corolla.server.compute import PRIORITY_FORWARD
from corolla.server.saved_graphs import DEFAULT_MAX_BYTES, SavedGraph, SavedGraphs, activation_bytes
from corolla.wire.errors import BadRequestError, SessionLengthError
from corolla.wire.messages import BackwardRequest, BackwardResponse, ForwardResponse, TrainForwardRequest

#: Makes the blocks use a request's extra trainable tensors while it is active.
ExtraContext = Callable[[Sequence[torch.Tensor]], AbstractContextManager]


class TrainingBackend:
    """Forward/backward for training over a :class:`BlockBackend`'s stack, on its compute worker."""

    def __init__(
        self,
        backend: BlockBackend,
        *,
        max_batch_size: int,
        max_length: int,
        max_graph_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.backend = backend
        self.max_batch_size, self.max_length = max_batch_size, max_length
        self.graphs = SavedGraphs(max_graph_bytes)  # touched by compute jobs only

    def _check(self, request: TrainForwardRequest | BackwardRequest) -> None:
        backend = self.backend
        check_range(backend.stack, request.start, request.end)
        check_inputs(backend.hidden_size, request.hidden, request.positions, request.attention_mask, None)
        batch, tokens = request.hidden.shape[:2]
        if batch > self.max_batch_size:
            raise BadRequestError(f"batch of {batch} is over this server's limit of {self.max_batch_size}")
        if tokens > self.max_length:
            raise SessionLengthError(f"{tokens} tokens are over this server's limit of {self.max_length}")
        check_prompts(request.prompts, request.end - request.start, request.hidden)
        if request.prompts is not None and request.prompts.shape[2] > tokens:
            raise BadRequestError(
                f"{request.prompts.shape[2]} prompt tokens do not fit a sequence of {tokens} tokens"
            )
        if len(request.graph_id) > 64:
            raise BadRequestError(f"graph_id must be at most 64 bytes, got {len(request.graph_id)}")

    @staticmethod
    def _graph_key(
        request: TrainForwardRequest | BackwardRequest, peer: str, extras: bool = False
    ) -> tuple[str, bytes] | None:
        """Graphs are kept for the base model and for a client's own trainable extras (its LoRA), keyed by
        client, adapter and the forward's id; a served adapter's requests are recomputed."""
        adapter = getattr(request, "adapter", "")
        if not request.graph_id or (adapter and not extras):
            return None
        return f"{peer}/{adapter}", request.graph_id

    async def forward(
        self,
        request: TrainForwardRequest,
        peer: str = "",
        extra: Sequence[torch.Tensor] = (),
        extra_context: ExtraContext | None = None,
    ) -> ForwardResponse:
        """The span's output; with a ``graph_id``, its autograd graph (over ``extra`` too) is kept for the backward."""
        self._check(request)
        out = await self.backend.worker.submit(
            PRIORITY_FORWARD, self._forward, request.start, request.end, request.hidden, request.positions,
            request.attention_mask, request.prompts, self._graph_key(request, peer, bool(extra)), extra,
            extra_context,
        )  # fmt: skip
        return ForwardResponse(out)

    async def backward(self, request: BackwardRequest, peer: str = "") -> BackwardResponse:
        grad_hidden, grad_prompts, _ = await self.backward_grads(request, peer)
        return BackwardResponse(grad_hidden, grad_prompts)

    async def backward_grads(
        self,
        request: BackwardRequest,
        peer: str = "",
        extra: Sequence[torch.Tensor] = (),
        extra_context: ExtraContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Gradients w.r.t. the span's inputs, deep prompts and ``extra``: from the kept graph, or recomputed."""
        self._check(request)
        grad = request.grad_output
        if tuple(grad.shape) != tuple(request.hidden.shape) or not grad.is_floating_point():
            raise BadRequestError(
                f"grad_output must be floating point with the shape of hidden {list(request.hidden.shape)}, "
                f"got {grad.dtype} {list(grad.shape)}"
            )
        return await self.backend.worker.submit(
            PRIORITY_FORWARD, self._backward, self._graph_key(request, peer, bool(extra)), request.start,
            request.end, request.hidden, request.positions, request.attention_mask, grad, request.prompts, extra,
            extra_context,
        )  # fmt: skip

    def _forward(self, start, end, hidden, positions, mask, prompts, key, extra=(), extra_context=None):
        device, dtype = self.backend.device, self.backend.dtype
        if key is None:
            context = extra_context(list(extra)) if extra_context is not None else nullcontext()
            with context:
                out = run_blocks(
                    self.backend.stack, (start, end), hidden.to(device, dtype), positions.to(device),
                    mask.to(device), None if prompts is None else prompts.to(device, dtype),
                )  # fmt: skip
            return out.cpu()
        with torch.inference_mode(False), torch.enable_grad():  # keep the graph for the backward
            leaves = [hidden.to(device, dtype).detach().clone().requires_grad_(True)]
            if prompts is not None:
                leaves.append(prompts.to(device, dtype).detach().clone().requires_grad_(True))
            leaves += [t.to(device).detach().clone().requires_grad_(True) for t in extra]
            context = (
                extra_context(leaves[len(leaves) - len(extra) :]) if extra_context is not None else nullcontext()
            )
            with context:
                out = run_blocks(
                    self.backend.stack, (start, end), leaves[0], positions.to(device), mask.to(device),
                    leaves[1] if prompts is not None else None,
                )  # fmt: skip
        itemsize = torch.empty((), dtype=dtype).element_size()
        size = activation_bytes(self.backend.stack.config, hidden.shape[0] * hidden.shape[1], hidden.shape[1],
                                end - start, itemsize)  # fmt: skip
        self.graphs.put(key, SavedGraph((hidden, positions, mask, prompts), out, leaves, size, 0.0))
        return out.detach().cpu()

    def _backward(
        self, key, start, end, hidden, positions, mask, grad_output, prompts, extra=(), extra_context=None
    ):
        graph = None if key is None else self.graphs.pop(key)
        expected_leaves = 1 + (prompts is not None) + len(extra)
        if (
            graph is None
            or len(graph.leaves) != expected_leaves
            or not graph.matches(hidden, positions, mask, prompts)
        ):
            return self.span_backward(
                start, end, hidden, positions, mask, grad_output, prompts, extra, extra_context
            )
        with torch.inference_mode(False), torch.enable_grad():
            grads = torch.autograd.grad(
                graph.output, graph.leaves, grad_output.to(graph.output.device, graph.output.dtype),
                allow_unused=True,
            )  # fmt: skip
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, graph.leaves)]
        grad_prompts = None if prompts is None else grads[1].to("cpu", prompts.dtype)
        first_extra = 1 + (prompts is not None)
        return grads[0].to("cpu", hidden.dtype), grad_prompts, [g.cpu() for g in grads[first_extra:]]

    def span_backward(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        grad_output: torch.Tensor,
        prompts: torch.Tensor | None = None,
        extra: Sequence[torch.Tensor] = (),
        extra_context: ExtraContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Gradients w.r.t. ``hidden``, ``prompts`` and ``extra``, in their dtypes, on the CPU (compute thread).

        The compute worker runs jobs under ``inference_mode``; this leaves it for its own autograd graph.
        """
        device, dtype = self.backend.device, self.backend.dtype
        with torch.inference_mode(False), torch.enable_grad():
            leaves = [hidden.to(device, dtype).detach().clone().requires_grad_(True)]
            if prompts is not None:
                leaves.append(prompts.to(device, dtype).detach().clone().requires_grad_(True))
            extra_leaves = [t.to(device).detach().clone().requires_grad_(True) for t in extra]
            context = extra_context(extra_leaves) if extra_context is not None else nullcontext()
            with context:
                out = run_blocks(
                    self.backend.stack, (start, end), leaves[0], positions.to(device), mask.to(device),
                    leaves[1] if prompts is not None else None,
                )  # fmt: skip
            grads = torch.autograd.grad(
                out, leaves + extra_leaves, grad_output.to(device, out.dtype), allow_unused=True
            )
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves + extra_leaves)]
        grad_hidden = grads[0].to("cpu", hidden.dtype)
        grad_prompts = None if prompts is None else grads[1].to("cpu", prompts.dtype)
        return grad_hidden, grad_prompts, [g.cpu() for g in grads[len(leaves) :]]
