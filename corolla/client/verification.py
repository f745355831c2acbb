"""Catching servers that return wrong activations: a hop's outputs re-run on other servers and compared.

The client already holds everything a check needs. For every hop of an inference session it keeps the hop's
whole input history (what a failover replays) and receives every output the hop produced (the next hop's
inputs, or the last hop's outputs). So one stateless forward (``ForwardRequest``) of a hop's input history over
its blocks, on servers other than the hop's, checks every step that hop ever answered. Decisions:

- **When.** A hop's first step (the session's prefill, or its first step after joining by failover, which
  includes the replay) is always checked; every later step is checked with probability ``verify_fraction``
  (``ClientConfig``), drawn by the client with an unpredictable generator, so a server cannot tell which of its
  steps will be checked. The check starts as soon as the hop's input is known (concurrently with the hop's own
  step and the rest of the chain) and finishes before the step's result is returned: a caught lie never
  reaches a token.
- **Against whom.** Only servers announcing the suspect's ``torch_dtype`` and ``quantization`` (the same
  arithmetic, so the same tolerance), not banned, serving the session's adapter, drawn like a training forward
  (``plan_max_throughput``: in proportion to their forward throughput). None: the check is unverifiable
  (counted). Sessions with deep prompts or a client's own LoRA are not checked (a stateless forward would need
  the prompts or the upload; counted as unverifiable).
- **Tolerance.** Per token, ``||suspect - reference|| / ||reference||`` over the hidden size, on real (unpadded)
  tokens; the largest must stay under :data:`TOLERANCES` of the dtype (plus :data:`INT8_EXTRA` when the session
  sends activations as int8, both sides then rounded the same way). Measured honest differences between a
  session's incremental steps and a full forward (tiny Llama, 8 blocks; SmolLM2-135M, 2 x 15 blocks, real
  embeddings): float32 2e-6, float16 2.5e-3, bfloat16 2.2e-2; int8 activations add up to 2e-2. The
  tolerances keep a margin of 5x (bfloat16) to 500x (float32).
- **Who lied.** When the reference disagrees, a third opinion is asked of servers other than both (if any):
  the majority wins. The suspect keeps its place only if a majority sides with it; a verifier outvoted by the
  suspect and the third server is banned instead. With no third server the client cannot tell who lied: it
  trusts the replica (the suspect is banned, the report says unconfirmed), so a lying replica can frame an
  honest server when only two serve the blocks.
- **After a detection** the suspect is banned (the client's one :class:`FailurePolicy`), and the session
  recomputes from the first position that differed: the suspect's blocks are re-planned and replayed, every
  hop after it is sent the corrected inputs again from that position (servers overwrite their caches there).
- **Evidence** is logged (error, tolerance, largest element difference, first differing position, the voters),
  counted in :class:`VerificationStats` (``model.verification_stats``) and published as a
  :class:`~corolla.wire.reports.TamperReport` through a :class:`ReportSink` (the DHT's, when the client has one).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from corolla.client.failure_policy import blame
from corolla.client.liveness import await_alive
from corolla.client.remote_autograd import call_peer
from corolla.client.routing import Hop, plan_max_throughput
from corolla.wire.messages import ForwardRequest, ForwardResponse
from corolla.wire.records import ServerInfo
from corolla.wire.reports import REPORT_KIND, REPORT_TTL, TamperReport, report_key
from corolla.wire.tensors import INT8_ROWWISE, decode_tensor, encode_tensor

if TYPE_CHECKING:
    from corolla.client.sequence_manager import RemoteSequenceManager

logger = logging.getLogger(__name__)

#: Largest per-token relative L2 error an honest server of this dtype shows against another (see above).
TOLERANCES = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
#: Added when activations travel as int8 (``activation_compression="int8"``).
INT8_EXTRA = 5e-2
#: Reports kept in memory per client.
MAX_REPORTS = 100


def tolerance_for(torch_dtype: str, compression: str | None, override: float | None = None) -> float:
    if override is not None:
        return override
    base = TOLERANCES.get(torch_dtype, max(TOLERANCES.values()))
    return base + (INT8_EXTRA if compression == INT8_ROWWISE else 0.0)


@dataclass(frozen=True)
class Comparison:
    """How far ``output`` is from ``reference`` on the real tokens, against ``tolerance``."""

    error: float  # largest per-token ||output - reference|| / ||reference||
    max_abs: float  # largest element difference
    first_position: int  # first sequence position whose error exceeds the tolerance, -1 if none
    tokens: int  # real tokens compared
    tolerance: float

    @property
    def agrees(self) -> bool:
        return self.first_position < 0


def compare(output: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, tolerance: float) -> Comparison:
    """Compare ``[B, T, H]`` hidden states on the positions ``mask`` marks real (padding is not compared). Shapes
    that differ, and non-finite values, are disagreement from position 0."""
    if output.shape != reference.shape:
        return Comparison(float("inf"), float("inf"), 0, int(mask.sum()), tolerance)
    a, b = output.float(), reference.float()
    diff = (a - b).norm(dim=-1)
    error = diff / b.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    error = torch.where(torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1), error, torch.inf)
    error = torch.where(mask, error, 0.0)
    bad = (error > tolerance).any(dim=0).nonzero()
    max_abs = (a - b).abs().amax(-1).masked_fill(~mask, 0.0).max()
    return Comparison(
        float(error.max()), float(max_abs), int(bad[0]) if len(bad) else -1, int(mask.sum()), tolerance
    )


@dataclass(frozen=True)
class Verdict:
    """Who lied, by majority of the opinions (see the module docstring)."""

    suspect_lied: bool
    verifier_lied: bool
    confirmed: bool


def decide(suspect_vs_first: Comparison, suspect_vs_third: Comparison | None, first_vs_third: Comparison | None):
    """The majority rule: the suspect keeps its place only if most opinions side with it; a tie (no third
    opinion, or three different answers) goes against the suspect, unconfirmed."""
    if suspect_vs_first.agrees:
        return Verdict(False, False, True)
    if suspect_vs_third is not None and suspect_vs_third.agrees:
        return Verdict(False, True, True)
    confirmed = first_vs_third is not None and first_vs_third.agrees
    return Verdict(True, False, confirmed)


@dataclass
class VerificationStats:
    """Counts of one client's checks (``model.verification_stats``)."""

    checks: int = 0  # hop checks started
    agreed: int = 0  # checks whose reference agreed with the hop
    unverifiable: int = 0  # no other server of the same dtype and quantization, or it failed, or not checkable
    checked_tokens: int = 0  # tokens (rows x positions) re-run on other servers, third opinions included
    third_opinions: int = 0
    detections: int = 0  # servers banned for wrong outputs
    confirmed: int = 0  # of those, outvoted by at least two other servers
    verifier_bans: int = 0  # verifiers banned, outvoted by the suspect and a third server
    recomputed_tokens: int = 0  # positions the session recomputed after a detection
    reports: list[TamperReport] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class ReportSink(Protocol):
    """Where detections are published (the DHT, for ``corolla health``)."""

    async def publish(self, report: TamperReport) -> None: ...


class NoReportSink:
    """Keeps reports in the client only (``VerificationStats.reports``)."""

    async def publish(self, report: TamperReport) -> None:
        return None


class RecordStoreLike(Protocol):
    async def store(
        self, kind: str, key: str, subkey: str, record: object, expiration: float, owned: bool
    ) -> bool: ...


class RecordStoreSink:
    """Publishes reports as signed records (:class:`corolla.swarm.discovery.RecordStore`): kind ``REPORT_KIND``,
    key :func:`~corolla.wire.reports.report_key`, subkey the reporting client's peer id (owned: nobody else may
    write it, and a client's newer report on a server replaces its older one), expiring after ``REPORT_TTL``."""

    def __init__(self, records: RecordStoreLike, peer_id: str):
        self.records, self.peer_id = records, peer_id

    async def publish(self, report: TamperReport) -> None:
        key = report_key(report.dht_prefix, report.suspect)
        await self.records.store(REPORT_KIND, key, self.peer_id, report, REPORT_TTL, owned=True)


@dataclass
class Check:
    """One pending check of a hop: the hop's whole input (and positions, mask) and the reference's task."""

    hop: Hop
    info: ServerInfo
    inputs: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    compression: str | None
    reference: asyncio.Task  # (outputs, peers) or None: unverifiable


@dataclass(frozen=True)
class Finding:
    """A hop caught lying: recompute from ``first_position``."""

    peer: str
    first_position: int


class Verifier:
    """One client's checks: which steps, against whom, the verdicts, bans, stats and reports."""

    def __init__(self, manager: RemoteSequenceManager):
        self.manager = manager
        self.stats = VerificationStats()
        self.sink: ReportSink = _default_sink(manager)
        self.rng = random.Random(os.urandom(16))  # servers must not predict which steps are checked
        self._caught: dict[str, int] = {}
        #: longest history a stateless forward reproduces (dynamic RoPE: the model's original context), None: any
        self.max_length: int | None = None
        self._publishing: set[asyncio.Task] = set()

    def due(self, checks_done: int) -> bool:
        """Whether to check a hop now: always its first step, later steps with probability verify_fraction."""
        return checks_done == 0 or self.rng.random() < self.manager.config.verify_fraction

    def start(
        self,
        hop: Hop,
        inputs,
        positions,
        mask,
        compression: str | None,
        adapter: str | None,
    ) -> Check | None:
        """Start the reference forward of ``hop``'s whole input; None when the hop cannot be checked."""
        span = self.manager.spans.get(hop.peer_id)
        self.stats.checks += 1
        if span is None or (self.max_length is not None and inputs.shape[1] > self.max_length):
            self.stats.unverifiable += 1
            return None
        if compression == INT8_ROWWISE:  # what the suspect computed on
            inputs = _int8_round_trip(inputs, self.manager.config.max_message_bytes)
        info = span.info
        coro = self._opinion(hop, info, inputs, positions, mask, {hop.peer_id}, adapter)
        return Check(hop, info, inputs, positions, mask, compression, asyncio.ensure_future(coro))

    async def judge(self, check: Check, outputs: torch.Tensor, adapter: str | None):
        """Compare the hop's ``outputs`` with the reference (and a third opinion if they disagree); ban, count and
        report. Returns a :class:`Finding` when the hop lied."""
        opinion = await check.reference
        if opinion is None:
            self.stats.unverifiable += 1
            return None
        reference, first_peers = opinion
        config = self.manager.config
        tolerance = tolerance_for(check.info.torch_dtype, check.compression, config.verify_tolerance)
        outputs = self._received(outputs, check.compression)
        mask = check.mask
        first = compare(outputs, self._received(reference, check.compression), mask, tolerance)
        if first.agrees:
            self.stats.agreed += 1
            return None
        exclude = {check.hop.peer_id, *first_peers}
        third = await self._opinion(check.hop, check.info, check.inputs, check.positions, mask, exclude, adapter)
        vs_third = first_vs_third = None
        third_peers: list[str] = []
        if third is not None:
            self.stats.third_opinions += 1
            third_out, third_peers = self._received(third[0], check.compression), third[1]
            vs_third = compare(outputs, third_out, mask, tolerance)
            first_vs_third = compare(self._received(reference, check.compression), third_out, mask, tolerance)
        verdict = decide(first, vs_third, first_vs_third)
        if verdict.verifier_lied:
            self.stats.verifier_bans += 1
            for peer in first_peers:
                self.manager.policy.ban(
                    peer, f"outvoted as a verifier of blocks {check.hop.start}..{check.hop.end}"
                )
            return None
        against = first_peers + (third_peers if first_vs_third is not None and first_vs_third.agrees else [])
        agreeing = third_peers if vs_third is not None and vs_third.agrees else []
        self._convict(check, first, against, agreeing, verdict.confirmed)
        return Finding(check.hop.peer_id, first.first_position)

    def _convict(self, check: Check, first: Comparison, against: list[str], agreeing: list[str], confirmed: bool):
        hop, peer = check.hop, check.hop.peer_id
        self.stats.detections += 1
        self.stats.confirmed += confirmed
        self._caught[peer] = self._caught.get(peer, 0) + 1
        why = (
            f"wrong activations for blocks [{hop.start}, {hop.end}): per-token relative error {first.error:.3g} over "
            f"the tolerance {first.tolerance:.3g} ({check.info.torch_dtype}"
            f"{', int8 activations' if check.compression == INT8_ROWWISE else ''}), largest element difference "
            f"{first.max_abs:.3g}, first differing position {first.first_position} of {check.inputs.shape[1]}; "
            f"{'confirmed' if confirmed else 'unconfirmed (no majority)'}: disagreeing {', '.join(against)}"
            f"{'; agreeing ' + ', '.join(agreeing) if agreeing else ''}"
        )
        logger.warning("Server %s returned %s", peer, why)
        self.manager.policy.ban(peer, why)
        report = TamperReport(
            self.manager.model.dht_prefix, peer, hop.start, hop.end, first.error, first.tolerance, first.max_abs,
            first.first_position, first.tokens, check.info.torch_dtype, check.compression or "", tuple(against),
            tuple(agreeing), confirmed, time.time(), self._caught[peer],
        )  # fmt: skip
        self.stats.reports = [*self.stats.reports[-(MAX_REPORTS - 1) :], report]
        task = asyncio.ensure_future(self._publish(report))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, report: TamperReport) -> None:
        try:
            await self.sink.publish(report)
        except Exception as e:  # publishing is best effort; the ban and the stats are what protect this client
            logger.warning("Could not publish the report on %s: %r", report.suspect, e)

    def _received(self, tensor: torch.Tensor, compression: str | None) -> torch.Tensor:
        """A reference output as the suspect's reached the client (int8-rounded when the session uses int8)."""
        if compression == INT8_ROWWISE:
            return _int8_round_trip(tensor, self.manager.config.max_message_bytes)
        return tensor

    def candidates(self, info: ServerInfo, exclude: set[str], adapter: str | None):
        """Servers whose outputs are comparable with the suspect's: same dtype and quantization, usable."""
        manager = self.manager
        return [
            s
            for s in manager.spans.values()
            if s.peer_id not in exclude
            and not manager.policy.is_banned(s.peer_id)
            and s.info.torch_dtype == info.torch_dtype
            and s.info.quantization == info.quantization
            and (adapter is None or adapter in s.info.adapters)
        ]

    async def _opinion(self, hop: Hop, info, inputs, positions, mask, exclude, adapter):
        """``(outputs, peers)`` of blocks [hop.start, hop.end) over ``inputs`` on servers outside ``exclude``, or None
        if none can say (no such server, a failure, or the request is over the message limit)."""
        manager = self.manager
        if inputs.numel() * 4 > manager.config.max_message_bytes // 2:
            return None

        async def attempt():
            route = plan_max_throughput(
                self.candidates(info, exclude, adapter), hop.start, hop.end, manager.rtts, self.rng
            )
            if route is None:
                return None
            x = inputs
            for step in route:
                request = ForwardRequest(manager.model, step.start, step.end, x, positions, mask, adapter or "")
                async with blame(step.peer_id):
                    expected = _expected_forward(manager, step, x.shape[0] * x.shape[1])
                    response = await await_alive(
                        manager, step.peer_id, call_peer(manager, step.peer_id, request, ForwardResponse), expected
                    )
                    if response.hidden.shape != x.shape:
                        raise ValueError(
                            f"a forward answered shape {tuple(response.hidden.shape)} for {tuple(x.shape)}"
                        )
                self.stats.checked_tokens += x.shape[0] * x.shape[1]
                x = response.hidden.to(inputs.dtype)
            return x, [step.peer_id for step in route]

        try:
            return await manager.policy.retry(attempt)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a check that cannot be made must not fail the user's step
            logger.info("Could not check blocks [%d, %d) of %s: %r", hop.start, hop.end, hop.peer_id, e)
            return None


def _default_sink(manager: RemoteSequenceManager) -> ReportSink:
    """The DHT's record store when the client reads the DHT, else nowhere (in-process swarms)."""
    from corolla.swarm.discovery import DHTDiscovery

    if isinstance(manager.discovery, DHTDiscovery):
        records = manager.discovery.records
        return RecordStoreSink(records, records.trust.peer_key.peer_id)
    return NoReportSink()


def _expected_forward(manager: RemoteSequenceManager, hop: Hop, tokens: int) -> float:
    """Seconds a forward of ``tokens`` over ``hop`` should take (a generous guess from the server's record)."""
    span = manager.spans.get(hop.peer_id)
    blocks = hop.end - hop.start
    rtt = manager.rtts.get(hop.peer_id, 0.1)
    if span is not None and span.info.forward_throughput > 0:
        return rtt + tokens * blocks / span.info.forward_throughput
    latency = span.info.inference_latency if span is not None and span.info.inference_latency > 0 else 0.1
    return rtt + latency * blocks * max(1, tokens // 8)


def _int8_round_trip(tensor: torch.Tensor, max_bytes: int) -> torch.Tensor:
    return decode_tensor(encode_tensor(tensor.float(), INT8_ROWWISE), max_bytes).to(tensor.dtype)


_verifiers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def verifier_for(manager: RemoteSequenceManager) -> Verifier:
    """The one :class:`Verifier` of a client (created on first use)."""
    verifier = _verifiers.get(manager)
    if verifier is None:
        verifier = _verifiers[manager] = Verifier(manager)
    return verifier


def configure_for_model(chain: object, config) -> None:
    """Model-specific limits of the checks of ``chain``'s sessions (``config``: the model's HF config). With dynamic
    RoPE, keys cached before a sequence outgrew ``max_position_embeddings`` keep their old frequencies
    (transformers does the same), so a stateless forward of a longer history legitimately differs from the
    session's steps: such histories are not checked (counted unverifiable)."""
    from corolla.client.sequence_manager import RemoteSequenceManager
    from corolla.models.layers import rope_parameters

    if isinstance(chain, RemoteSequenceManager) and rope_parameters(config)["rope_type"] == "dynamic":
        verifier_for(chain).max_length = config.max_position_embeddings


def verification_stats(chain: object) -> dict:
    """The checks' counts of a chain's client (``{}`` for a chain that never verified, e.g. in process)."""
    verifier = _verifiers.get(chain)
    return verifier.stats.as_dict() if verifier is not None else {}
