"""Reports that clients publish about servers caught returning wrong activations (see
:mod:`corolla.client.verification`).

A :class:`TamperReport` is one client's evidence against one server: which blocks, how far its outputs were
from the other servers' (the per-token relative L2 error against the tolerance of its dtype), the first
position that differed, and how the other servers voted. It is meant to be stored as a signed record under
:func:`report_key` with the reporting client's peer id as subkey (owned by the reporter, so nobody can report
in another's name and one client holds one report per server), and read by ``corolla health``. A report is a
claim, not a proof: a lying client can report an honest server, so readers count distinct reporters.
"""

from __future__ import annotations

from dataclasses import dataclass

#: bump when fields change (readers skip other versions)
REPORT_VERSION = 1
#: how long a report stays in the DHT (seconds)
REPORT_TTL = 24 * 3600.0
#: the signed record's kind (``RecordStore.store``/``fetch``)
REPORT_KIND = "tamper_report"


@dataclass(frozen=True)
class TamperReport:
    """One client's verdict on server ``suspect`` (a peer id) for blocks ``[start, end)`` of ``dht_prefix``.

    ``error``: the largest per-token ``||suspect - reference|| / ||reference||`` over the checked tokens;
    ``tolerance`` what honest servers of ``torch_dtype`` (and ``compression``) stay under; ``max_abs`` the largest
    element difference; ``first_position`` the first sequence position over the tolerance; ``tokens`` how many
    positions were checked. ``against``/``agreeing`` are the peer ids of the servers whose outputs disagreed
    with the suspect's / agreed with it; ``confirmed``: a majority of at least two servers disagreed (with one
    replica alone the client cannot tell who lied and trusts the replica). ``detected_at`` is unix time;
    ``count`` how many times this reporter caught this suspect."""

    dht_prefix: str
    suspect: str
    start: int
    end: int
    error: float
    tolerance: float
    max_abs: float
    first_position: int
    tokens: int
    torch_dtype: str
    compression: str
    against: tuple[str, ...]
    agreeing: tuple[str, ...]
    confirmed: bool
    detected_at: float
    count: int = 1
    version: int = REPORT_VERSION


def report_key(dht_prefix: str, suspect: str) -> str:
    """The DHT key holding every client's report about ``suspect`` (subkey: the reporter's peer id)."""
    return f"{dht_prefix}.tamper.{suspect}"


@dataclass(frozen=True)
class ReportSummary:
    """What ``corolla health`` shows of the reports on one server: distinct reporters, how many of them had a
    majority against it, the detections they counted, and the latest (unix time)."""

    reporters: int
    confirmed: int
    detections: int
    latest: float


def summarize_reports(reports: dict[str, TamperReport]) -> ReportSummary | None:
    """``{reporter peer id: report}`` (as ``RecordStore.fetch`` returns owned records) -> a summary, or None."""
    valid = [r for r in reports.values() if r.version == REPORT_VERSION]
    if not valid:
        return None
    return ReportSummary(
        len(valid), sum(r.confirmed for r in valid), sum(r.count for r in valid), max(r.detected_at for r in valid)
    )
