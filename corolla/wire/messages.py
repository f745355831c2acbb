"""The calls between clients and servers: one frozen dataclass per request and response.

Every call runs over its own stream: ``ping``, ``info`` and ``forward`` send one request and read one
reply; ``inference`` opens with :class:`InferenceOpen`, then sends one :class:`InferenceStep` per
step and reads one :class:`InferenceStepResult` (or :class:`ErrorResponse`) for each. Each step
carries its cache offset and the validity of its tokens, so a replay or a retry of a step is exact:
a step at an offset below the session's length overwrites from there.

Block ranges are ``[start, end)``, absolute block indices of the model, everywhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from corolla.wire.records import ServerInfo


@dataclass(frozen=True)
class ModelRef:
    """Which model a request is for: a server refuses any other."""

    dht_prefix: str
    config_hash: str


@dataclass(frozen=True)
class PingRequest:
    pass


@dataclass(frozen=True)
class PingResponse:
    server_time: float


@dataclass(frozen=True)
class InfoRequest:
    pass


@dataclass(frozen=True)
class InfoResponse:
    info: ServerInfo


@dataclass(frozen=True)
class ForwardRequest:
    """Run blocks [start, end) over a whole sequence, without a cache.

    ``positions`` [B, T] int64 are the tokens' position ids; ``attention_mask`` [B, T] bool marks
    real tokens (False = padding). ``adapter`` names a LoRA adapter to apply (one the server serves, or
    the client's own uploaded one, see :class:`LoraUploadRequest`); "" = the base model.
    """

    model: ModelRef
    start: int
    end: int
    hidden: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    adapter: str = ""


@dataclass(frozen=True)
class ForwardResponse:
    hidden: torch.Tensor


@dataclass(frozen=True)
class InferenceOpen:
    """Open an inference session over blocks [start, end) with a preallocated cache."""

    model: ModelRef
    start: int
    end: int
    max_length: int
    batch_size: int
    adapter: str = ""  # LoRA adapter for every step of the session ("" = base model), see ForwardRequest
    #: names this session for steps pushed by the previous server of the chain (16 random bytes; b"": none)
    session_id: bytes = b""
    #: the secret a pushed step must carry (16 random bytes, known to the client and the pushing server)
    push_token: bytes = b""
    #: how the server sends this session's outputs and pushes ("" as computed, or a wire compression such
    #: as "int8_rowwise": lossy, for bandwidth-bound links; see corolla.wire.tensors)
    compression: str = ""


@dataclass(frozen=True)
class InferenceOpened:
    """The session is ready; ``dtype`` is what the server computes in (send hidden states in it)."""

    dtype: str
    max_length: int


#: bytes of a session id and of a push token (InferenceOpen, PushTarget, PushedStep)
PUSH_ID_BYTES = 16


@dataclass(frozen=True)
class PushTarget:
    """Where a step's output goes next: a server of the chain and its session (see :class:`PushedStep`)."""

    peer_id: str
    session_id: bytes
    token: bytes


@dataclass(frozen=True)
class InferenceStep:
    """Process ``hidden`` [B, T, H] at cache positions [offset, offset + T).

    ``positions`` [B, T] int64 are position ids; ``attention_mask`` [B, T] bool marks real tokens.
    ``step_id`` names the step (a session computes each id at most once: a step that arrives both pushed
    and relayed runs once). ``push`` is the rest of the chain: the server sends its output to ``push[0]``
    as a :class:`PushedStep` carrying ``push[1:]``, besides answering here. ``hypo_ids`` [B] int64 (beam
    search): before this step, cache row ``i`` becomes row ``hypo_ids[i]``.
    """

    offset: int
    hidden: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    step_id: int = 0
    push: tuple[PushTarget, ...] = ()
    hypo_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class PushedStep:
    """A step one server sends straight to the next server's session (server-to-server push).

    Starts a push stream: every message on it is a ``PushedStep``; nothing is answered unless one is refused
    (an :class:`ErrorResponse`, then the stream closes). The receiving session runs it only if ``token``
    is its ``push_token``, answers the result to its client as for a client's step, and pushes on to
    ``push[0]``.
    """

    session_id: bytes
    token: bytes
    step_id: int
    offset: int
    hidden: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    push: tuple[PushTarget, ...] = ()
    hypo_ids: torch.Tensor | None = None  # as in InferenceStep: every server of the chain reorders its cache


@dataclass(frozen=True)
class InferenceStepResult:
    hidden: torch.Tensor
    step_id: int = 0  # the step's (a client skips results of steps it no longer waits for)


@dataclass(frozen=True)
class ProbeRequest:
    """A payload of known size, for another server to estimate its bandwidth to this one."""

    payload: bytes


@dataclass(frozen=True)
class ProbeResponse:
    received: int


@dataclass(frozen=True)
class TrainForwardRequest:
    """Forward over blocks [start, end) for training: a :class:`ForwardRequest` plus trainable extras.

    ``prompts`` [end - start, B or 1, K, H] (deep prompt tuning) or None: before block ``i`` the server
    adds ``prompts[i - start]`` to the hidden states of the first K tokens (see
    ``corolla.models.deep_prompts``). Answered with :class:`ForwardResponse`.
    """

    model: ModelRef
    start: int
    end: int
    hidden: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    prompts: torch.Tensor | None
    adapter: str = ""  # as in ForwardRequest
    #: a random id from a client that will call backward: the server may keep this forward's autograd graph
    #: for the BackwardRequest naming the same id (see ``corolla.server.saved_graphs``); b"" = don't keep
    graph_id: bytes = b""


@dataclass(frozen=True)
class BackwardRequest:
    """Gradients of blocks [start, end) at ``hidden`` (the span's inputs), given ``grad_output``.

    The server recomputes the span's forward with autograd and returns the gradients with respect to
    ``hidden`` and to every trainable extra sent (``prompts``, as in :class:`TrainForwardRequest`). Its
    own weights are never trained. ``grad_output`` has the shape of ``hidden``.
    """

    model: ModelRef
    start: int
    end: int
    hidden: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    grad_output: torch.Tensor
    prompts: torch.Tensor | None
    adapter: str = ""  # as in ForwardRequest; a client's own adapter gets its gradients back
    #: the id of this span's TrainForwardRequest to this server, if any (its kept graph saves a recomputation)
    graph_id: bytes = b""


@dataclass(frozen=True)
class BackwardResponse:
    """``grad_hidden`` has the shape of the request's ``hidden``; ``grad_prompts`` that of its prompts."""

    grad_hidden: torch.Tensor
    grad_prompts: torch.Tensor | None
    #: gradients of the request's client adapter (its A and B) for the span's blocks, when it named one
    adapter_grads: tuple[LoraTensors, ...] = ()


@dataclass(frozen=True)
class InferencePromptStep:
    """An :class:`InferenceStep` over the deep-prompted prefix: ``prompts`` [end - start, B or 1, K, H]
    are added, before each block, to the tokens of this step at cache positions below K. Answered with
    :class:`InferenceStepResult`."""

    offset: int
    hidden: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor
    prompts: torch.Tensor
    step_id: int = 0  # as in InferenceStep (a prompt step is never pushed)


@dataclass(frozen=True)
class LoraTensors:
    """One LoRA pair of a block: ``a`` [r, in], ``b`` [out, r] for the HF linear ``target``
    (``self_attn.q_proj``, relative to the block), or their gradients."""

    block: int
    target: str
    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class LoraUploadRequest:
    """A client's own LoRA weights for blocks [start, end) of the server, stored under (client, ``name``).

    Forward and backward requests then name it in ``adapter``; the delta is ``scale * B(A(x))``. An upload
    under an existing name adds to (or overwrites blocks of) it; ``replaces`` names an older version to
    drop first. The server keeps it until released or unused for its TTL, within a per-client byte bound.
    Answered with :class:`LoraUploadResponse`.
    """

    model: ModelRef
    name: str
    start: int
    end: int
    scale: float
    weights: tuple[LoraTensors, ...]
    replaces: str = ""


@dataclass(frozen=True)
class LoraUploadResponse:
    stored_bytes: int  # this client's adapter bytes now held by the server


@dataclass(frozen=True)
class LoraReleaseRequest:
    """Drop this client's adapter ``name`` (all of this client's, if ``name`` is ""). Answered with
    :class:`LoraReleaseResponse`."""

    model: ModelRef
    name: str


@dataclass(frozen=True)
class LoraReleaseResponse:
    released: bool


@dataclass(frozen=True)
class MemberProof:
    """The first frame of every stream a member of a private swarm opens: ``HMAC(swarm key, caller's peer
    id)`` (see :mod:`corolla.swarm.trust`). The call's own first message follows at once, in the same write."""

    proof: bytes


@dataclass(frozen=True)
class ErrorResponse:
    """``code`` is one of :data:`corolla.wire.errors.ERROR_CLASSES`; ``message`` says what was wrong."""

    code: str
    message: str


class Kind(enum.IntEnum):
    PING_REQUEST = 1
    PING_RESPONSE = 2
    INFO_REQUEST = 3
    INFO_RESPONSE = 4
    FORWARD_REQUEST = 5
    FORWARD_RESPONSE = 6
    INFERENCE_OPEN = 7
    INFERENCE_OPENED = 8
    INFERENCE_STEP = 9
    INFERENCE_STEP_RESULT = 10
    ERROR = 11
    PUSHED_STEP = 12
    TRAIN_FORWARD_REQUEST = 20
    BACKWARD_REQUEST = 21
    BACKWARD_RESPONSE = 22
    INFERENCE_PROMPT_STEP = 23
    LORA_UPLOAD_REQUEST = 30
    LORA_UPLOAD_RESPONSE = 31
    LORA_RELEASE_REQUEST = 32
    LORA_RELEASE_RESPONSE = 33
    PROBE_REQUEST = 40
    PROBE_RESPONSE = 41
    MEMBER_PROOF = 50


MESSAGE_CLASSES: dict[Kind, type] = {
    Kind.PING_REQUEST: PingRequest,
    Kind.PING_RESPONSE: PingResponse,
    Kind.INFO_REQUEST: InfoRequest,
    Kind.INFO_RESPONSE: InfoResponse,
    Kind.FORWARD_REQUEST: ForwardRequest,
    Kind.FORWARD_RESPONSE: ForwardResponse,
    Kind.INFERENCE_OPEN: InferenceOpen,
    Kind.INFERENCE_OPENED: InferenceOpened,
    Kind.INFERENCE_STEP: InferenceStep,
    Kind.INFERENCE_STEP_RESULT: InferenceStepResult,
    Kind.ERROR: ErrorResponse,
    Kind.PUSHED_STEP: PushedStep,
    Kind.TRAIN_FORWARD_REQUEST: TrainForwardRequest,
    Kind.BACKWARD_REQUEST: BackwardRequest,
    Kind.BACKWARD_RESPONSE: BackwardResponse,
    Kind.INFERENCE_PROMPT_STEP: InferencePromptStep,
    Kind.LORA_UPLOAD_REQUEST: LoraUploadRequest,
    Kind.LORA_UPLOAD_RESPONSE: LoraUploadResponse,
    Kind.LORA_RELEASE_REQUEST: LoraReleaseRequest,
    Kind.LORA_RELEASE_RESPONSE: LoraReleaseResponse,
    Kind.PROBE_REQUEST: ProbeRequest,
    Kind.PROBE_RESPONSE: ProbeResponse,
    Kind.MEMBER_PROOF: MemberProof,
}
KINDS: dict[type, Kind] = {cls: kind for kind, cls in MESSAGE_CLASSES.items()}
