"""How a call starts and ends on a server: the caller's membership, its first request, and who hangs up first.

**Membership first.** In a private swarm (see :mod:`corolla.swarm.trust`) a call must start with the caller's
:class:`~corolla.wire.messages.MemberProof`. At most :data:`MAX_PROOF_FRAME_BYTES` are read from a caller not yet
known to be a member, and the proof is checked against the peer id libp2p authenticated, so an outsider's call ends
with :class:`~corolla.wire.errors.NotAMemberError` before its request is decoded, and before any allocation or
compute. A server of an open swarm refuses a proof by name (the caller holds a key the server does not).

**The caller hangs up first.** After its last reply the handler waits (up to ``request_timeout``, discarding
anything more) for the caller to close its end, and only then closes its own: p2pd may *reset* a stream whose
handler end closes while the caller's is open (its two copy loops race on the close), and a reset throws away the
bytes the caller's daemon has not handed over yet. On a busy machine that cut replies at 32 KiB boundaries (p2pd
copies in 32 KiB chunks) or dropped them whole. A refused push stream is the exception: its pusher reads no
replies, so it is closed at once and the pusher opens a new one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from corolla.swarm.trust import SwarmKey
from corolla.wire.errors import BadRequestError, NotAMemberError
from corolla.wire.framing import read_message
from corolla.wire.messages import MemberProof

#: In a private swarm nothing bigger than a member proof is read from a caller not yet known to be a member.
MAX_PROOF_FRAME_BYTES = 256


async def read_request(
    reader: asyncio.StreamReader, peer: str, swarm_key: SwarmKey | None, max_bytes: int, timeout: float
) -> Any:
    """The call's first request, once ``peer`` has shown it is a member of ``swarm_key``'s swarm (if any)."""
    if swarm_key is None:
        request = await asyncio.wait_for(read_message(reader, max_bytes), timeout)
        if isinstance(request, MemberProof):
            raise NotAMemberError("this server runs an open swarm, but the caller holds a swarm key")
        return request
    try:
        proof = await asyncio.wait_for(read_message(reader, MAX_PROOF_FRAME_BYTES), timeout)
    except BadRequestError:  # not a proof (too large, or not even a frame): an outsider's call
        proof = None
    if not isinstance(proof, MemberProof):
        raise NotAMemberError(
            "this server belongs to a private swarm: start with its swarm key (--swarm_key / swarm_key=)"
        )
    if not swarm_key.is_member(peer, proof.proof):
        raise NotAMemberError("wrong swarm key: this server belongs to another private swarm")
    return await asyncio.wait_for(read_message(reader, max_bytes), timeout)


async def wait_for_hang_up(reader: asyncio.StreamReader, timeout: float) -> None:
    """Read and discard until the caller closes its end (EOF), for at most ``timeout`` seconds.

    A handler's last reply is safe only once the caller has read it; the caller closes when it has (see the
    module docstring: closing first lets p2pd reset the stream and drop the reply's unread tail).
    """

    async def until_eof() -> None:
        while await reader.read(1 << 16):
            pass

    try:
        await asyncio.wait_for(until_eof(), timeout)
    except (asyncio.TimeoutError, ConnectionError):
        pass
