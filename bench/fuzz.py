"""Live-server fuzzer: random and mutated frames to a real server over real p2pd streams while a normal client
generates.

Starts a loopback swarm (a bootstrap peer and one server hosting every block of a random tiny Llama), records a
greedy generation without the fuzzer, then sends ``--frames`` frames from a fuzzing peer of its own while the
same generation repeats, and prints JSON: whether the server stayed up (process alive, a ping answered), whether
every generation during the fuzz was token-identical to the one before it, the server's RSS before, at its peak
and after, and what the frames got (replies by error code, EOFs). Progress goes to stderr. The frames:

- valid messages of every kind (often naming the served model and plausible shapes) with one field replaced by
  random msgpack, bytes flipped, or sent under another kind;
- frames inside an open inference session (steps with one field broken);
- random headers (any length up to 4 GiB, any version, any kind), random payloads, arrays nested 100,000 deep,
  tens of thousands of nested empty arrays, tensors declaring huge or empty-but-huge shapes;
- truncated frames (the stream then closes early: no answer expected).

A reply of code ``internal`` means a handler raised something unexpected: a bug (``internal_errors`` in the
JSON). The same fuzzer runs in CI at a small count (tests/integration/test_fuzz.py).

Run: ``python -m bench.fuzz [--frames 10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

HANG_SECONDS = 30.0  # a complete frame unanswered this long counts as a hang


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--frames", type=int, default=10000, help="frames to send (default 10000)")
    p.add_argument("--concurrency", type=int, default=8, help="fuzzing streams at once (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the frames (default 0)")
    p.add_argument("--new_tokens", type=int, default=8, help="tokens of each normal generation (default 8)")
    p.add_argument("--workdir", type=Path, default=None, help="logs and checkpoint (default: a temporary folder)")
    return p.parse_args(argv)


# -- frames --------------------------------------------------------------------------------------------------


class FrameMaker:
    """Random and mutated frames (bytes), from one ``random.Random``: reproducible from its seed."""

    def __init__(self, rng: random.Random, model, hidden_size: int):
        self.rng, self.model, self.hidden = rng, model, hidden_size

    # values of each field type, biased towards what a server accepts
    def _int(self) -> int:
        r = self.rng.random()
        return self.rng.randint(-2, 10) if r < 0.7 else self.rng.choice([2**31, 2**63 - 1, 2**64 - 1, -(2**63)])

    def _tensor(self, kind: str = ""):
        import torch

        rng, b, t = self.rng, self.rng.randint(1, 2), self.rng.randint(1, 3)
        shape = {"hidden": [b, t, self.hidden], "positions": [b, t], "mask": [b, t]}.get(kind)
        if shape is None or rng.random() < 0.2:
            shape = [rng.randint(0, 3) for _ in range(rng.randint(0, 3))]
        dtype = {"positions": torch.int64, "mask": torch.bool}.get(kind, torch.float32)
        if rng.random() < 0.15:
            dtype = rng.choice(
                [torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.float64]
            )
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=gen).bool()
        if dtype.is_floating_point:
            return torch.randn(shape, generator=gen).to(dtype)
        return torch.randint(0, 8, shape, generator=gen).to(dtype)

    def _value(self, tp, name: str = ""):
        import dataclasses
        import enum
        import types
        import typing

        import torch

        rng = self.rng
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
            return None if rng.random() < 0.5 else self._value(inner, name)
        if origin is tuple:
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self._value(args[0]) for _ in range(rng.randint(0, 2)))
            return tuple(self._value(a) for a in args)
        if tp is torch.Tensor:
            kind = "hidden" if name in ("hidden", "grad_output") else name
            return self._tensor("mask" if name == "attention_mask" else kind)
        if dataclasses.is_dataclass(tp):
            if tp.__name__ == "ModelRef" and rng.random() < 0.7:
                return self.model
            hints = typing.get_type_hints(tp)
            return tp(*[self._value(hints[f.name], f.name) for f in dataclasses.fields(tp)])
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return rng.choice(list(tp))
        return {
            int: self._int,
            float: lambda: rng.choice([0.0, 1.0, -1.5, float("nan"), float("inf"), 1e308]),
            str: lambda: rng.choice(["", "x", "adapter", "int8_rowwise", "\u00e9" * rng.randint(0, 40)]),
            bool: lambda: rng.random() < 0.5,
            bytes: lambda: rng.randbytes(rng.choice([0, 16, 17, 40])),
        }[tp]()

    def message(self, cls=None):
        from corolla.wire.messages import MESSAGE_CLASSES

        cls = cls or self.rng.choice(list(MESSAGE_CLASSES.values()))
        return self._value(cls)

    def _random_msgpack(self, depth: int = 0):
        rng = self.rng
        r = rng.random()
        if depth < 3 and r < 0.3:
            return [self._random_msgpack(depth + 1) for _ in range(rng.randint(0, 4))]
        return rng.choice([None, True, rng.randint(-(2**63), 2**64 - 1), rng.random(), "s" * rng.randint(0, 9),
                           rng.randbytes(rng.randint(0, 9))])  # fmt: skip

    def mutated(self, message) -> tuple[bytes, bool]:
        """``(frame, complete)``: ``message`` broken one way; ``complete`` False when the frame is cut short."""
        import msgpack

        from corolla.wire.codec import to_obj
        from corolla.wire.framing import HEADER, encode_frame
        from corolla.wire.messages import KINDS
        from corolla.wire.records import WIRE_VERSION

        rng = self.rng
        how = rng.choice(["field", "field", "bytes", "kind", "truncate", "valid"])
        if how in ("bytes", "truncate", "valid"):
            frame = bytearray(encode_frame(message))
            if how == "bytes":
                for _ in range(rng.randint(1, 6)):
                    frame[rng.randrange(HEADER.size, len(frame))] = rng.randrange(256)
            if how == "truncate":
                return bytes(frame[: rng.randrange(len(frame))]), False
            return bytes(frame), True
        obj = to_obj(message)
        if how == "field" and obj:
            path = obj
            while True:  # descend into a nested field now and then
                i = rng.randrange(len(path))
                if isinstance(path[i], list) and path[i] and rng.random() < 0.4:
                    path = path[i]
                    continue
                path[i] = self._random_msgpack()
                break
        payload = msgpack.packb(obj, use_bin_type=True)
        kind = rng.choice(sorted(KINDS.values())) if how == "kind" else KINDS[type(message)]
        return HEADER.pack(len(payload), WIRE_VERSION, kind) + payload, True

    def odd(self) -> tuple[bytes, bool]:
        """A frame no encoder would write: odd headers, odd msgpack, bombs."""
        import msgpack

        from corolla.wire.framing import HEADER
        from corolla.wire.messages import Kind
        from corolla.wire.records import WIRE_VERSION

        rng = self.rng
        how = rng.choice(["header", "random", "deep", "nested", "huge_tensor", "empty_huge_tensor", "huge_bin"])
        kind = rng.choice(list(Kind))
        if how == "header":  # refused from the header alone whenever the length is over the limit
            length = rng.choice([0, 1, 7, 2**26 + 1, 2**31, 2**32 - 1])
            version = rng.choice([WIRE_VERSION, WIRE_VERSION, 0, 1, 99, 65535])
            answered = version != WIRE_VERSION or length == 0 or length > 2**26  # else it waits for the payload
            return HEADER.pack(length, version, rng.randrange(256)), answered
        if how == "random":
            payload = rng.randbytes(rng.randint(0, 200))
        elif how == "deep":
            payload = b"\x91" * 100_000 + b"\xc0"
        elif how == "nested":  # one byte per empty array: tens of thousands of lists
            payload = b"\xdc" + (0xFFFF).to_bytes(2, "big") + b"\x90" * 0xFFFF
        else:
            shape = [0, 2**31 - 1, 2**31 - 1] if how == "empty_huge_tensor" else [2**20, 2**20]
            tensor = ["float32", shape, "float32", b""]
            if how == "huge_bin":
                payload = b"\xc6" + (2**32 - 1).to_bytes(4, "big")
            else:
                model = [self.model.dht_prefix, self.model.config_hash]
                payload = msgpack.packb([model, 0, 1, tensor, tensor, tensor, ""], use_bin_type=True)
                kind = Kind.FORWARD_REQUEST
        return HEADER.pack(len(payload), WIRE_VERSION, kind) + payload, True


# -- the fuzzing peer ----------------------------------------------------------------------------------------


async def fuzz(transport, peer: str, model, hidden_size: int, frames: int, seed: int = 0, concurrency: int = 8,
               progress=None) -> dict:  # fmt: skip
    """Send ``frames`` random and mutated frames to ``peer`` (one stream per first frame, a few per session) and
    count what came back."""
    import torch

    from corolla.wire.framing import encode_frame, read_message
    from corolla.wire.messages import ErrorResponse, InferenceOpen, InferenceOpened, InferenceStep, MemberProof

    maker = FrameMaker(random.Random(seed), model, hidden_size)
    outcomes: Counter[str] = Counter()
    internal: list[str] = []
    hangs: list[str] = []
    sent = 0  # frames written (a session's frames after an error are not)

    def count_sent() -> None:
        nonlocal sent
        sent += 1
        if progress is not None and sent % 1000 == 0:
            progress(sent)

    async def exchange(batch: list[tuple[bytes, bool]], open_session: bool) -> None:
        reader, writer = await transport.open_stream(peer)
        try:
            if transport.member_proof is not None:  # a private swarm: fuzz past the membership check
                writer.write(encode_frame(MemberProof(transport.member_proof)))
            if open_session:
                writer.write(encode_frame(InferenceOpen(model, 0, 1, 8, 1)))
                opened = await asyncio.wait_for(read_message(reader), HANG_SECONDS)
                if not isinstance(opened, InferenceOpened):
                    outcomes["session_refused"] += 1
                    return
            for frame, complete in batch:
                writer.write(frame)
                count_sent()
                await writer.drain()
                if not complete:
                    outcomes["truncated_sent"] += 1
                    return
                try:
                    reply = await asyncio.wait_for(read_message(reader), HANG_SECONDS)
                except asyncio.IncompleteReadError:
                    outcomes["eof"] += 1
                    return
                except asyncio.TimeoutError:
                    hangs.append(frame[:64].hex())
                    return
                if isinstance(reply, ErrorResponse):
                    outcomes[f"error:{reply.code}"] += 1
                    if reply.code == "internal":
                        internal.append(reply.message)
                    return  # the call may have ended: the server discards the rest until we hang up
                outcomes[f"ok:{type(reply).__name__}"] += 1
        except (ConnectionError, OSError) as e:
            outcomes[f"stream_error:{type(e).__name__}"] += 1
        finally:
            writer.close()

    async def worker() -> None:
        rng = random.Random(maker.rng.randrange(2**63))
        while True:
            r = rng.random()
            if sent >= frames:
                return
            if r < 0.25:  # frames inside a session: a plausible first step, then mutated ones
                n = rng.randint(1, 3)
                step = InferenceStep(0, torch.randn(1, 1, hidden_size), torch.zeros(1, 1, dtype=torch.long),
                                     torch.ones(1, 1, dtype=torch.bool))  # fmt: skip
                batch = [
                    maker.mutated(step if i == 0 and rng.random() < 0.5 else maker.message()) for i in range(n)
                ]
                await exchange(batch, open_session=True)
            else:
                await exchange([maker.odd() if r > 0.85 else maker.mutated(maker.message())], open_session=False)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"frames": sent, "outcomes": dict(sorted(outcomes.items())), "internal_errors": internal[:20],
            "internal_error_count": len(internal), "hangs": len(hangs), "hang_examples": hangs[:5]}  # fmt: skip


# -- the benchmark -------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    import tempfile
    import threading

    import torch

    from bench.common import ProcessGroups, Swarm, log, rss_bytes, write_llama
    from corolla import AutoDistributedModelForCausalLM
    from corolla.swarm.bridge import LoopThread
    from corolla.swarm.node import NetworkConfig, SwarmNode
    from corolla.swarm.transport import P2PTransport
    from corolla.wire.messages import PingRequest, PingResponse

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corolla-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model_path = write_llama(workdir / "tiny-llama", hidden_size=64, intermediate_size=160, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, num_hidden_layers=4)  # fmt: skip
    groups = ProcessGroups(workdir)
    swarm = Swarm(groups)
    bridge = node = client = None
    try:
        log("starting a bootstrap peer and one server")
        swarm.start_dht()
        server = swarm.start_server("target", model_path, "0:4", "fuzz-llama")
        swarm.wait_online([server], "fuzz-llama", 4)
        client = AutoDistributedModelForCausalLM.from_pretrained(
            str(model_path), initial_peers=swarm.initial_peers, dht_prefix="fuzz-llama"
        )
        prompt = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(1))

        def generate() -> list[int]:
            with torch.no_grad():
                return client.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)[0].tolist()

        baseline = generate()  # also warms the server up before its RSS is read
        rss_before = rss_bytes(server.pid)
        log(f"baseline generation: {baseline[-args.new_tokens :]}; server RSS {rss_before / 2**20:.0f} MiB")

        bridge = LoopThread("fuzzer")
        node = bridge.run(SwarmNode.start(NetworkConfig(initial_peers=tuple(swarm.initial_peers),
                                                        host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True)))  # fmt: skip
        stop, generations, mismatches, client_errors, rss_peak = threading.Event(), [0], [], [], [rss_before]

        def normal_client() -> None:
            while not stop.is_set():
                try:
                    tokens = generate()
                except Exception as e:  # noqa: BLE001 - reported in the JSON
                    client_errors.append(repr(e))
                    continue
                generations[0] += 1
                if tokens != baseline:
                    mismatches.append(tokens)
                rss_peak[0] = max(rss_peak[0], rss_bytes(server.pid))

        rss_series = []  # MiB after each 1000 frames: flat if memory is bounded

        def progress(n: int) -> None:
            rss_series.append(round(rss_bytes(server.pid) / 2**20, 1))
            log(f"{n} frames sent; server RSS {rss_series[-1]} MiB")

        thread = threading.Thread(target=normal_client, name="normal-client", daemon=True)
        thread.start()
        start = time.perf_counter()
        report = bridge.run(fuzz(P2PTransport(node.p2p, node.trust.member_proof()), server.peer_id, _model_ref(model_path, "fuzz-llama"), 64,
                                 args.frames, args.seed, args.concurrency, progress=progress))  # fmt: skip
        elapsed = time.perf_counter() - start
        stop.set()
        thread.join(120)
        time.sleep(1.0)  # the server finishes what the last streams started
        alive = server.poll() is None
        ping = None
        if alive:
            try:
                ping = isinstance(
                    bridge.run(
                        P2PTransport(node.p2p, node.trust.member_proof()).call(
                            server.peer_id, PingRequest(), PingResponse, 10
                        )
                    ),
                    PingResponse,
                )
            except Exception as e:  # noqa: BLE001
                ping = repr(e)
        rss_after = rss_bytes(server.pid) if alive else None
        log_text = server.log_path.read_text()
        result = {
            "frames": report["frames"],
            "seconds": round(elapsed, 1),
            "server_alive": alive,
            "server_answers_ping": ping,
            "normal_client": {"generations": generations[0], "token_identical": not mismatches and generations[0] > 0,
                              "mismatches": len(mismatches), "errors": client_errors[:5],
                              "baseline_tokens": baseline[-args.new_tokens:]},
            "server_rss_mib": {"before": round(rss_before / 2**20, 1), "peak_sampled": round(rss_peak[0] / 2**20, 1),
                               "after": None if rss_after is None else round(rss_after / 2**20, 1),
                               "every_1000_frames": rss_series},
            "server_logged_exceptions": log_text.count("Traceback"),
            **{k: v for k, v in report.items() if k != "frames"},
        }  # fmt: skip
        print(json.dumps(result, indent=2))
    finally:
        if client is not None:
            client.shutdown()
        if bridge is not None:
            if node is not None:
                try:
                    bridge.run(node.shutdown(), timeout=10)
                except Exception:  # noqa: BLE001
                    pass
            bridge.shutdown()
        swarm.close()
        groups.kill_all()


def _model_ref(model_path: Path, dht_prefix: str):
    from corolla.models.checkpoint import Checkpoint, config_hash
    from corolla.wire.messages import ModelRef

    return ModelRef(dht_prefix, config_hash(Checkpoint(str(model_path)).config))


if __name__ == "__main__":
    sys.exit(main())
