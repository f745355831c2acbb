"""A client-mode peer that only reads the swarm's records: for `corolla health`, the demo's wait for its
servers, and test fixtures. One sync object over a network thread of its own (:mod:`corolla.swarm.bridge`).
"""

from __future__ import annotations

import asyncio

from corolla.swarm.bridge import LoopThread
from corolla.swarm.node import NetworkConfig, SwarmNode
from corolla.wire.records import ModelRecord, ServerInfo
from corolla.wire.reports import REPORT_KIND, ReportSummary, TamperReport, report_key, summarize_reports


class SwarmReader:
    def __init__(self, network: NetworkConfig, name: str = "corolla-swarm-reader", timeout: float = 60.0):
        self.timeout = timeout
        self.bridge = LoopThread(name=name)
        try:
            self.node = self.bridge.run(SwarmNode.start(network), timeout=timeout)
        except BaseException:
            self.bridge.shutdown()
            raise

    def block_infos(self, dht_prefix: str, num_blocks: int) -> list[dict[str, ServerInfo]]:
        """For each block, ``{peer_id: ServerInfo}`` as the DHT has it now."""
        return self.bridge.run(self.node.records.block_infos(dht_prefix, num_blocks), timeout=self.timeout)

    def tamper_reports(self, dht_prefix: str, peers: list[str]) -> dict[str, ReportSummary]:
        """What clients reported of each of ``peers`` returning wrong activations (servers without reports are
        left out): one DHT read per server."""

        async def read() -> dict[str, ReportSummary]:
            found = await asyncio.gather(
                *(self.node.records.fetch(REPORT_KIND, report_key(dht_prefix, p), TamperReport) for p in peers)
            )
            summaries = {peer: summarize_reports(reports) for peer, reports in zip(peers, found)}
            return {peer: s for peer, s in summaries.items() if s is not None}

        return self.bridge.run(read(), timeout=self.timeout)

    def models(self) -> list[ModelRecord]:
        """The models servers name in the swarm's model directory."""
        return self.bridge.run(self.node.records.models(), timeout=self.timeout)

    @property
    def rejected(self) -> dict[str, int]:
        """Records ignored so far, by reason (forged, expired, not sealed with the key, ...; ``refused_by_dht``:
        values our DHT node dropped from lookups before they reached us)."""
        out = dict(self.node.records.rejected)
        if self.node.validator.refused:
            out["refused_by_dht"] = self.node.validator.refused
        return out

    def trust_json(self) -> dict:
        """Whether the swarm read is private (and by which key) and what was ignored: for health views."""
        key = self.node.trust.swarm_key
        return {
            "private": key is not None,
            "key": key.fingerprint if key else None,
            "ignored_records": self.rejected,
        }

    def close(self) -> None:
        try:
            self.bridge.run(self.node.shutdown(), timeout=10)
        finally:
            self.bridge.shutdown()  # also ends the tasks hivemind leaves behind

    def __enter__(self) -> SwarmReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
