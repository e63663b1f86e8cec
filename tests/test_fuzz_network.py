"""Fuzzing the network-facing handlers added for NAT traversal and private swarms (issue #10 item 5):
the control-frame reader, the dial-back helper, our relay (reserve / connect / stop), the
hole-punch ticket request, the KAD request guard, the swarm-key handshake, and the client's
reading of results, taps and in_digest. Each handler runs in-process over in-memory streams (the
relay and dial-back hosts are stand-ins that never touch a network) on trio's virtual clock, so a
handler that waits for bytes that never come hits its own deadline at once instead of hanging.
Whatever arrives, the answer is a typed error or a clean refusal, never another exception, never a
hang, and no read goes past the handler's limit.

The default suite runs a short pass; `pytest -m slow tests/test_fuzz_network.py` runs the long one
(MOLINK_FUZZ_EXAMPLES examples, default 100k, per handler).
"""

from __future__ import annotations

import os
from collections import Counter
from contextlib import suppress
from types import SimpleNamespace

import msgpack
import pytest
import torch
import trio
import trio.testing
import varint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from molink.crypto.identity import Identity
from molink.crypto.swarm_key import SwarmKey
from molink.dht import reachability as rb
from molink.dht import relay as rl
from molink.dht.control import CONTROL_LIMITS, CONTROL_TIMEOUT, ControlError, checked_ip, read_control
from molink.dht.dht_limits import DHTLimits, KadRequestGuard, _publisher_and_expiry
from molink.dht.direct import ERROR, SECRET_BYTES, TICKET, TICKET_BYTES
from molink.dht.holepunch import PunchingDirectListener
from molink.dht.private_swarm import (
    KEY_CHECK,
    MULTISTREAM_HEADER,
    NONCE_BYTES,
    OPENING_BYTES,
    PrivateSwarmTCP,
    SwarmKeyMismatch,
    _direction_cipher,
)
from molink.dht.model_keys import model_dht_key
from molink.dht.records import SpanRecord
from molink.dht.streams import STREAM_ERRORS, ClosedByPeer, open_framed_stream
from molink.dht.wire import LENGTH_PREFIX_BYTES, Frame, WireError, decode_frame, encode_frame, encode_tensor
from molink.peer import protocol as p
from molink.swarm.inference_errors import InferenceError
from molink.swarm.inference_session import RemoteSession
from molink.swarm.routing import RouteHop

LONG = int(os.environ.get("MOLINK_FUZZ_EXAMPLES", "100000"))


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def lengths(short: int):
    return pytest.mark.parametrize("examples", [pytest.param(short, id="short"),
                                                pytest.param(LONG, id="long", marks=pytest.mark.slow)])


scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=40), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                      max_leaves=12)
IDS = [Identity(bytes([i]) * 32).peer_id for i in range(1, 5)]
B58 = [peer.to_base58() for peer in IDS]
RARELY = st.sampled_from([False, False, False, True])
ADDRESSES = st.sampled_from([None, ("127.0.0.1", 4001), ("127.0.0.2", 4001), ("::1", 4001), ("not an ip", 1)])


def run_virtual(main) -> None:
    """trio.run on a virtual clock: whatever waits for a deadline gets there at once."""
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def control(kind: str, body: dict) -> bytes:
    return encode_frame(Frame(kind, 0, body))  # default limits: oversized ones are the reader's business


def control_or_junk(kinds: list[str], body):
    return st.one_of(st.builds(control, st.sampled_from(kinds + ["x"]), body), st.binary(max_size=80),
                     st.builds(lambda n, rest: n.to_bytes(4, "big") + rest, st.integers(0, 2**32 - 1),
                               st.binary(max_size=40)))


class FakeConn:
    def __init__(self, peer_id, address=None, relayed: bool = False):
        self.peer_id, self._address = peer_id, address
        if relayed:
            self.molink_relayed = True

    def get_remote_address(self):
        return self._address

    def get_transport_addresses(self):
        return []


class PipeStream:
    """The libp2p stream subset the handlers use, over one end of an in-memory pair; counts what
    the handler reads and hands out at most `max_chunk` bytes per read (split segments)."""

    def __init__(self, stream, conn=None, max_chunk: int = 1 << 20):
        self.stream, self.muxed_conn, self.max_chunk = stream, conn, max_chunk
        self.bytes_read, self.closed, self.was_reset = 0, False, False

    async def read(self, n=None):
        data = await self.stream.receive_some(min(n or self.max_chunk, self.max_chunk))
        self.bytes_read += len(data)
        return data

    async def write(self, data):
        await self.stream.send_all(data)

    async def close(self):
        self.closed = True
        with suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self.stream.send_eof()

    async def reset(self):
        self.was_reset = True
        await self.stream.aclose()

    def get_remote_address(self):
        return self.muxed_conn.get_remote_address() if self.muxed_conn is not None else None


async def received(end) -> bytes:
    """Everything that came out of the other end before it closed (or went quiet)."""
    data = b""
    with trio.move_on_after(1):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await end.receive_some():
                data += chunk
    return data


def first_frame(data: bytes) -> Frame | None:
    if len(data) < LENGTH_PREFIX_BYTES:
        return None
    length = int.from_bytes(data[:LENGTH_PREFIX_BYTES], "big")
    return decode_frame(data[:LENGTH_PREFIX_BYTES + length], CONTROL_LIMITS)


def decodable(data: bytes) -> Frame | None:
    """The request as read_control sees it: the frame its length prefix announces, if it decodes."""
    try:
        return decode_frame(data[:LENGTH_PREFIX_BYTES + int.from_bytes(data[:LENGTH_PREFIX_BYTES], "big")],
                            CONTROL_LIMITS)
    except WireError:
        return None


# ---------------------------------------------------------------------- control frames


@lengths(300)
def test_control_reader_reads_one_bounded_frame_or_raises_control_error(examples):
    frames = st.builds(control, st.text(max_size=70), st.dictionaries(st.text(max_size=12), values, max_size=6))

    @fuzz(examples)
    @given(data=control_or_junk([], values).filter(bool) | frames, trailing=st.binary(max_size=32),
           eof=st.booleans(), chunk=st.integers(1, 64), ip=st.one_of(values, st.ip_addresses().map(str)))
    def run(data, trailing, eof, chunk, ip):
        out = checked_ip(ip)
        assert out is None or (isinstance(out, str) and checked_ip(out) == out)
        sent = data + trailing

        async def main():
            left, right = trio.testing.memory_stream_pair()
            stream = PipeStream(right, max_chunk=chunk)
            await left.send_all(sent)
            if eof:
                await left.send_eof()
            with trio.fail_after(CONTROL_TIMEOUT + 5):
                try:
                    frame = await read_control(stream)
                except ControlError:
                    frame = None
            assert stream.bytes_read <= LENGTH_PREFIX_BYTES + CONTROL_LIMITS.max_frame_bytes
            if frame is not None:  # exactly the frame was read, nothing past it
                assert stream.bytes_read == LENGTH_PREFIX_BYTES + int.from_bytes(sent[:4], "big")
                assert isinstance(frame.type, str) and isinstance(frame.body, dict)

        run_virtual(main)

    run()


# ---------------------------------------------------------------------- dial-back helper


class NoNetworkHost:
    def get_network(self):
        raise OSError("the fuzz harness has no network")  # every dial-back fails at once, no traffic


def dialback_request_is_valid(frame: Frame | None) -> bool:
    if frame is None or frame.type != rb.REQUEST:
        return False
    nonce, ports = frame.body.get("nonce"), frame.body.get("ports")
    return isinstance(nonce, bytes) and len(nonce) == rb.NONCE_BYTES and isinstance(ports, list) \
        and 0 < len(ports) <= rb.MAX_PORTS and all(type(x) is int and 0 < x < 65536 for x in ports)


@lengths(200)
def test_dialback_helper_answers_any_request_with_a_result_or_a_refusal(examples):
    body = st.fixed_dictionaries({}, optional={
        "nonce": st.one_of(st.binary(min_size=16, max_size=16), values),
        "ports": st.one_of(st.lists(st.integers(-3, 70000), min_size=1, max_size=5), values),
        "extra": values})
    good = st.builds(lambda n, ports: control(rb.REQUEST, {"nonce": n, "ports": ports}),
                     st.binary(min_size=16, max_size=16), st.lists(st.integers(1, 65535), min_size=1, max_size=4))
    request = st.tuples(good | control_or_junk([rb.REQUEST, rb.RESULT], body), ADDRESSES, RARELY, st.integers(1, 5))

    @fuzz(examples)
    @given(st.lists(request, min_size=1, max_size=5).map(lambda rs: [r[:3] for r in rs for _ in range(r[3])]))
    def run(requests):
        async def main():
            helper = rb.DialbackHelper(NoNetworkHost())
            results = Counter()
            for data, address, relayed in requests:
                left, right = trio.testing.memory_stream_pair()
                stream = PipeStream(right, FakeConn(IDS[0], address, relayed))
                await left.send_all(data)
                await left.send_eof()
                with trio.fail_after(rb.ASK_TIMEOUT + 5):
                    await helper.handle(stream)
                assert stream.bytes_read <= LENGTH_PREFIX_BYTES + CONTROL_LIMITS.max_frame_bytes
                reply, request = first_frame(await received(left)), decodable(data)
                assert (reply is None) == (request is None)  # every readable request is answered
                event(f"dial-back: {reply and (reply.type, reply.body.get('reason'))}")
                if reply is None:
                    continue
                ip = checked_ip(address[0]) if address else None
                if not dialback_request_is_valid(request):
                    assert (reply.type, reply.body["reason"]) == (rb.REFUSED, "malformed request")
                elif ip is None or relayed:
                    assert reply.type == rb.REFUSED and "address" in reply.body["reason"]
                elif reply.type == rb.REFUSED:
                    assert reply.body["reason"] == "rate limited" and results[ip] == rb.PER_IP_BURST
                else:
                    results[ip] += 1
                    assert reply.type == rb.RESULT and reply.body["ip"] == ip
                    assert reply.body["nonce"] == request.body["nonce"]
                    assert reply.body["reached"] == [False] * len(request.body["ports"])
            assert len(helper._tokens) <= len(requests)

        run_virtual(main)

    run()


# ---------------------------------------------------------------------- relay


class RelayHost:
    """What RelayService and RelayedListener use of a host. A stop stream leads to a fake target
    that checks the relay's `stop` and answers with fuzzed bytes; nothing is ever dialled."""

    def __init__(self, nursery, connected):
        self.nursery, self.connected = nursery, connected
        self.answer: bytes | None = None
        self.target_sends = b""
        self.target_got: list[bytes] = []

    def get_network(self):
        return self

    def get_connections(self, peer):
        return [object()] if peer in self.connected else []

    async def new_stream(self, peer, protocols):
        assert peer in self.connected and protocols == [rl.RELAY_STOP_PROTOCOL]  # never dials a stranger
        if self.answer is None:
            raise OSError("the target does not answer")
        relay_end, target_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._target, target_end, self.answer, self.target_sends)
        return PipeStream(relay_end, FakeConn(peer))

    async def _target(self, end, answer, payload):
        stop = await read_control(PipeStream(end))
        assert stop.type == rl.STOP and stop.body["peer"] in B58 and isinstance(stop.body["ip"], str)
        await end.send_all(answer + payload)
        await end.send_eof()
        self.target_got.append(await received(end))

    async def upgrade_inbound_connection(self, raw, maddr):
        raise OSError("no Noise in the fuzz harness")


@lengths(200)
def test_relay_service_answers_reserve_and_connect_with_typed_replies(examples):
    body = st.fixed_dictionaries({}, optional={"peer": st.one_of(st.sampled_from(B58), values), "x": values})
    good = st.one_of(st.just(control(rl.RESERVE, {})),
                     st.sampled_from(B58[:1] * 3 + B58).map(lambda b: control(rl.CONNECT, {"peer": b})))
    request = st.tuples(st.one_of(good, good, control_or_junk([rl.RESERVE, rl.CONNECT, rl.STOP], body)),
                        st.integers(0, 3), ADDRESSES, RARELY, st.binary(max_size=100))
    answer = st.one_of(st.none(), st.just(control(rl.OK, {"x": 1})), st.just(control(rl.OK, {})),
                       control_or_junk([rl.OK, rl.REFUSED], st.dictionaries(st.text(max_size=8), values, max_size=3)))

    @fuzz(examples)
    @given(st.lists(request, min_size=1, max_size=8), answer, st.binary(max_size=100),
           st.sets(st.integers(0, 3)))
    def run(requests, answer, target_sends, connected):
        async def main():
            async with trio.open_nursery() as nursery:
                host = RelayHost(nursery, {IDS[i] for i in connected | {0}})
                host.answer, host.target_sends = answer, target_sends
                limits = rl.RelayLimits(max_reservations=2, max_reservations_per_ip=1, circuit_bytes=64,
                                        circuit_seconds=5.0)
                service = rl.RelayService(host, limits)
                for data, source, address, relayed, payload in [(control(rl.RESERVE, {}), 0, None, False, b""),
                                                                 *requests]:
                    left, right = trio.testing.memory_stream_pair()
                    stream = PipeStream(right, FakeConn(IDS[source], address, relayed))
                    await left.send_all(data + payload)
                    await left.send_eof()
                    with trio.fail_after(3 * rl.HANDSHAKE_TIMEOUT + 10):
                        await service.handle(stream)
                    assert service.circuits == {}
                    assert len(service.reservations) <= limits.max_reservations
                    per_ip = Counter(r.ip for r in service.reservations.values())
                    assert max(per_ip.values(), default=0) <= limits.max_reservations_per_ip
                    reply = first_frame(await received(left))
                    request = decodable(data + payload)
                    event(f"relay: {reply and (reply.type, reply.body.get('reason'))}")
                    if relayed:
                        assert reply.type == rl.REFUSED and stream.bytes_read == 0
                        continue
                    assert (reply is None) == (request is None)  # every readable request is answered
                    if reply is None:
                        continue
                    assert reply.type in (rl.REFUSED, rl.RESERVED, rl.OK)
                    if reply.type == rl.RESERVED:
                        assert request.type == rl.RESERVE and IDS[source] in service.reservations
                        assert isinstance(reply.body["ip"], str)
                    if reply.type == rl.OK:  # only to a reserved, connected target that said ok
                        target = rl._peer_id(request.body["peer"])
                        assert request.type == rl.CONNECT and target in service.reservations
                        assert target in host.connected and first_frame(answer).type == rl.OK
                nursery.cancel_scope.cancel()

        run_virtual(main)

    run()


@lengths(300)
def test_relay_stop_handler_and_circuit_addresses_refuse_junk(examples):
    body = st.fixed_dictionaries({}, optional={"peer": st.one_of(st.sampled_from(B58), values),
                                               "ip": st.one_of(st.sampled_from(["127.0.0.1", "::1"]), values)})
    address = st.one_of(st.text(max_size=80), st.builds(
        lambda a, b, c: f"{a}/p2p/{b}/p2p-circuit{c}", st.sampled_from(["/ip4/127.0.0.1/tcp/1", "", "/x"]),
        st.one_of(st.sampled_from(B58), st.text(max_size=70)),
        st.one_of(st.just(""), st.sampled_from(B58).map(lambda b: f"/p2p/{b}"), st.text(max_size=70))))

    @fuzz(examples)
    @given(control_or_junk([rl.STOP, rl.CONNECT], body), st.integers(0, 3), st.booleans(), address)
    def run(data, relay, eof, addr):
        try:
            relay_part, relay_id, target = rl.split_circuit_addr(addr)
            assert relay_id.to_base58() in addr and (target is None or target.to_base58() in addr)
        except (ValueError, ControlError):
            pass

        async def main():
            listener = rl.RelayedListener(RelayHost(None, set()))
            listener.relays = {IDS[0]}
            left, right = trio.testing.memory_stream_pair()
            stream = PipeStream(right, FakeConn(IDS[relay]))
            await left.send_all(data)
            if eof:
                await left.send_eof()
            with trio.fail_after(rl.HANDSHAKE_TIMEOUT + 5):
                await listener.handle_stop(stream)
            assert stream.bytes_read <= LENGTH_PREFIX_BYTES + CONTROL_LIMITS.max_frame_bytes
            reply = first_frame(await received(left))
            event(f"stop: {reply and reply.type}")
            if reply is not None and reply.type == rl.OK:  # the upgrade then fails: reset, no exception
                request = decodable(data)
                assert relay == 0 and request.type == rl.STOP and request.body["peer"] in B58
                assert stream.was_reset
            else:
                assert reply is None or reply.type == rl.REFUSED

        run_virtual(main)

    run()


# ---------------------------------------------------------------------- hole-punch tickets


class RecordingNursery:
    def __init__(self):
        self.punches = []

    def start_soon(self, fn, sock, my_port, ip, port, peer):
        sock.close()  # the port was bound (no traffic); the punch itself is not run here
        self.punches.append((ip, port, peer))


@lengths(150)
def test_punch_ticket_request_answers_a_ticket_or_an_error(examples):
    protocol = "/molink/fuzz/1.0.0"
    body = st.fixed_dictionaries({}, optional={
        "protocol": st.one_of(st.just(protocol), values),
        "punch_port": st.one_of(st.integers(0, 70000), values)})
    good = st.builds(lambda port: ("frame", Frame(TICKET, 1, {"protocol": protocol, "punch_port": port})),
                     st.one_of(st.none(), st.integers(1000, 65535)))
    request = st.one_of(good, st.builds(lambda t, b: ("frame", Frame(t, 1, b)), st.sampled_from([TICKET, ERROR, "x"]), body),
                        st.binary(max_size=60).map(lambda b: ("raw", b)))

    @fuzz(examples)
    @given(request, st.booleans())
    def run(request, knows_ip):
        async def main():
            host = SimpleNamespace(_molink_relay_peer_ips={B58[0]: "127.0.0.1"} if knows_ip else {})
            listener = PunchingDirectListener({protocol: lambda stream: None}, host=host)
            listener._nursery = nursery = RecordingNursery()
            client_end, peer_end = trio.testing.memory_stream_pair()
            reply = None
            with trio.fail_after(10):
                async with trio.open_nursery() as tasks:
                    async def serve():
                        async with open_framed_stream(PipeStream(peer_end, FakeConn(B58[0]))) as framed:
                            await listener.handle_ticket_request(framed)

                    tasks.start_soon(serve)
                    kind, what = request
                    if kind == "raw":
                        await client_end.send_all(what)
                        await client_end.send_eof()
                        reply_data = await received(client_end)
                    else:
                        async with open_framed_stream(PipeStream(client_end)) as client:
                            with suppress(*STREAM_ERRORS):
                                await client.send(what)
                                reply = await client.receive(timeout=5)
            if kind == "raw":
                assert len(nursery.punches) <= 1 and len(listener._tickets) <= 1  # junk that happens to parse
                return
            punch_port, asked = what.body.get("punch_port"), what.body.get("protocol")
            good = what.type == TICKET and asked == protocol and (
                punch_port is None or (type(punch_port) is int and 1024 <= punch_port < 65536 and knows_ip))
            assert reply is not None
            event(f"ticket: {reply.type}, punched {bool(nursery.punches)}")
            if not good:
                assert reply.type == ERROR and isinstance(reply.body["message"], str) and not nursery.punches
                return
            assert reply.type == TICKET and len(reply.body["ticket"]) == TICKET_BYTES
            assert len(reply.body["secret"]) == SECRET_BYTES and len(listener._tickets) == 1
            if punch_port is None:
                assert "punch_port" not in reply.body and not nursery.punches
            else:
                assert nursery.punches == [("127.0.0.1", punch_port, B58[0])]
                assert 0 < reply.body["punch_port"] < 65536

        trio.run(main)

    run()


# ---------------------------------------------------------------------- KAD request guard


class FakeKad:
    """libp2p's KAD handler reduced to what the guard relies on: it reads the one message the
    guard's view shows it, stores what a validator would accept, answers."""

    def __init__(self):
        self.value_store = SimpleNamespace(store={}, remove=lambda key: self.value_store.store.pop(key, None))
        self.provider_store = SimpleNamespace(providers={})

    async def handle_stream(self, view):
        payload = await read_varint_prefixed_bytes_limited(view, MAX_DHT_MESSAGE_SIZE)
        assert await view.read(1) == b""  # exactly one message, then EOF
        message = Message()
        message.ParseFromString(payload)
        sender = str(view.muxed_conn.peer_id)
        if message.type == Message.MessageType.PUT_VALUE and message.HasField("record"):
            if _publisher_and_expiry(message.record.value) is not None:
                self.value_store.store[message.record.key] = message.record.value
        elif message.type == Message.MessageType.ADD_PROVIDER:
            self.provider_store.providers.setdefault(message.key, {})[sender] = True
        reply = Message(type=message.type).SerializeToString()
        await view.write(varint.encode(len(reply)) + reply)


PUBLISHERS = [Identity(bytes([i]) * 32) for i in range(10, 13)]
MODEL = model_dht_key("tiny", {"num_hidden_layers": 6}, "00" * 32)
SIGNED = [SpanRecord.create(i, MODEL, 0, 3, ["/ip4/127.0.0.1/tcp/1"], 10.0, 100, "t").sign(i) for i in PUBLISHERS]


def kad_message(kind, key, record_key, value, with_record) -> bytes:
    message = Message(type=kind, key=key)
    if with_record:
        message.record.key, message.record.value = record_key, value
    payload = message.SerializeToString()
    return varint.encode(len(payload)) + payload


@lengths(150)
def test_kad_request_guard_ends_every_stream_and_keeps_its_quotas(examples):
    keys = st.sampled_from([b"k%d" % i for i in range(8)])
    message = st.one_of(
        st.builds(kad_message, st.sampled_from(list(Message.MessageType.values())), keys, keys,
                  st.one_of(st.sampled_from(SIGNED), st.binary(max_size=40),
                            st.builds(lambda r, v: msgpack.packb({"record": r}), values, values)), st.booleans()),
        st.binary(max_size=30),  # junk
        st.builds(lambda n, rest: varint.encode(n) + rest, st.integers(MAX_DHT_MESSAGE_SIZE, 2**63),
                  st.binary(max_size=10)))  # a length over the limit: refused before any body is read
    good = st.builds(kad_message, st.sampled_from([Message.MessageType.PUT_VALUE, Message.MessageType.ADD_PROVIDER,
                                                   Message.MessageType.FIND_NODE]), keys, keys,
                     st.sampled_from(SIGNED), st.just(True))
    stream = st.tuples(st.integers(0, 2), st.lists(st.one_of(good, good, good, message), min_size=2,
                                                   max_size=12).map(b"".join),
                       st.booleans())
    limits = DHTLimits(lookup_burst=6, lookups_per_second=1.0, store_burst=5, stores_per_second=1.0,
                       records_per_publisher=2, records_per_sender=3, max_records=4, provider_keys_per_sender=2,
                       max_provider_keys=3, max_tracked_peers=2, idle_timeout=3.0)

    @fuzz(examples)
    @given(st.lists(stream, min_size=1, max_size=4))
    def run(streams):
        async def main():
            dht = FakeKad()
            guard = KadRequestGuard(dht, limits)
            for sender, data, eof in streams:
                left, right = trio.testing.memory_stream_pair()
                conn = PipeStream(right, FakeConn(IDS[sender]))
                await left.send_all(data)
                if eof:
                    await left.send_eof()
                with trio.fail_after(limits.idle_timeout * 3):
                    await guard.handle_stream(conn)
                assert conn.closed or conn.was_reset
                event(f"kad: refused {sorted(guard.refused)}, {len(dht.value_store.store)} stored")
                assert conn.bytes_read <= len(data)
                records = guard.quotas.records.values()
                assert len(dht.value_store.store) <= limits.max_records
                assert max(Counter(r.sender for r in records).values(), default=0) <= limits.records_per_sender
                assert max(Counter(r.publisher for r in records).values(), default=0) <= limits.records_per_publisher
                providers = dht.provider_store.providers
                assert len(providers) <= limits.max_provider_keys
                for peer in B58:
                    assert sum(peer in entry for entry in providers.values()) <= limits.provider_keys_per_sender

        run_virtual(main)

    run()


# ---------------------------------------------------------------------- swarm key


KEY, OTHER_KEY = SwarmKey(bytes(range(32))), SwarmKey(bytes(range(1, 33)))


def opening(key: SwarmKey, nonce: bytes) -> bytes:
    return nonce + _direction_cipher(key, nonce).encryptor().update(KEY_CHECK)


@lengths(300)
def test_swarm_key_handshake_accepts_only_the_key_and_reads_only_the_opening(examples):
    nonces = st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)
    sends = st.one_of(st.builds(lambda n: ("member", opening(KEY, n)), nonces),
                      st.builds(lambda n: ("other", opening(OTHER_KEY, n)), nonces),
                      st.binary(max_size=80).map(lambda b: ("junk", b)),
                      st.binary(max_size=30).map(lambda b: ("plain libp2p", MULTISTREAM_HEADER + b)),
                      st.just(("echo", b"")))

    @fuzz(examples)
    @given(sends, st.integers(0, OPENING_BYTES + 8), st.binary(max_size=20), st.booleans(), st.integers(1, 50),
           st.booleans())
    def run(send, cut, trailing, eof, chunk, dialing):
        kind, data = send
        data = data[:cut] if kind != "member" or cut < OPENING_BYTES else data + trailing
        good = kind == "member" and len(data) >= OPENING_BYTES

        async def main():
            tcp = PrivateSwarmTCP(KEY)
            accepted = []
            left, right = trio.testing.memory_stream_pair()
            stream = PipeStream(right, max_chunk=chunk)

            async def peer():
                if kind == "echo":  # our own opening reflected back
                    got = b""
                    while len(got) < OPENING_BYTES and (more := await left.receive_some(OPENING_BYTES - len(got))):
                        got += more
                    await left.send_all(got)
                else:
                    await left.send_all(data)
                if eof:
                    await left.send_eof()

            async def handler(keyed):
                accepted.append(stream.bytes_read)

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(peer)
                    if dialing:
                        raw = SimpleNamespace(stream=stream, close=stream.close)
                        try:
                            conn = await tcp._keyed_dial(raw, Multiaddr("/ip4/127.0.0.1/tcp/1"))
                            assert isinstance(conn, RawConnection)
                            accepted.append(stream.bytes_read)
                        except SwarmKeyMismatch:
                            pass
                    else:
                        await tcp.create_listener(handler).handler(stream)
                        assert tcp.pending_handshakes == 0 and tcp.refused == (0 if good else 1)
            event(f"swarm key: {kind}, {'accepted' if accepted else 'refused'}")
            assert accepted == ([OPENING_BYTES] if good else [])
            assert stream.bytes_read <= OPENING_BYTES

        run_virtual(main)

    run()


# ---------------------------------------------------------------------- the client's reading of results and taps


def honest_answers(hops: int, relay: bool, tokens: int) -> list[tuple[int, Frame]]:
    """What a well-behaved route answers to step 1: taps from all but the last hop, then a result
    (pushed), or a result from every hop (relayed)."""
    def body():
        return {"step": 1, "hidden": encode_tensor(torch.randn(1, tokens, HIDDEN)), "in_digest": os.urandom(16)}
    if relay:
        return [(hop, Frame(p.RESULT, 1, body())) for hop in range(hops)]
    return [(hop, Frame(p.TAP, 0, body())) for hop in range(hops - 1)] + [(hops - 1, Frame(p.RESULT, 1, body()))]


class SilentFramed:
    async def send(self, frame):
        pass


HIDDEN = 8


@lengths(100)
def test_client_reads_results_taps_and_digests_into_a_tensor_or_an_inference_error(examples):
    tensor = st.one_of(
        st.builds(lambda n: encode_tensor(torch.randn(1, n, HIDDEN)), st.integers(1, 3)),
        st.builds(lambda shape: encode_tensor(torch.zeros(shape)), st.lists(st.integers(0, 3), max_size=3)),
        st.builds(lambda n: encode_tensor(torch.ones(1, n, HIDDEN, dtype=torch.long)), st.integers(1, 2)),
        values)
    body = st.fixed_dictionaries({}, optional={
        "step": st.one_of(st.integers(0, 3), values), "hidden": tensor,
        "in_digest": st.one_of(st.binary(min_size=16, max_size=16), values),
        "code": st.sampled_from([p.BAD_REQUEST, p.NEXT_HOP_UNREACHABLE, "x"]), "message": values})
    incoming = st.one_of(st.builds(Frame, st.sampled_from([p.RESULT, p.TAP, p.OPENED, p.ERROR, p.PUSH, "x"]),
                                st.integers(0, 3), body),
                      st.just(ClosedByPeer("the peer hung up")))

    edits = st.lists(st.tuples(st.integers(0, 9), st.sampled_from(["drop", "insert", "swap"]), st.integers(0, 2),
                               incoming), max_size=3)

    @fuzz(examples)
    @given(st.integers(1, 3), st.booleans(), st.integers(1, 3), st.booleans(), edits,
           st.lists(st.tuples(st.integers(0, 2), incoming), max_size=8))
    def run(hops, relay, tokens, honest, edits, junk):
        events = honest_answers(hops, relay, tokens) if honest else junk
        for where, how, hop, item in edits if honest else ():
            where %= len(events) + 1
            if how == "insert":
                events.insert(where, (hop, item))
            elif how == "drop" and where < len(events):
                del events[where]
            elif how == "swap" and where + 1 < len(events):
                events[where], events[where + 1] = events[where + 1], events[where]

        async def main():
            route = [RouteHop(SimpleNamespace(peer_id=f"peer-{i}"), i, i + 1) for i in range(hops)]
            session = RemoteSession(None, route, "key", 1, 64, HIDDEN, relay=relay, step_timeout=5.0, tap=True,
                                    compression="raw")
            session.streams = [SilentFramed() for _ in route]
            for hop, item in events:
                session._events_send.send_nowait((hop % hops, item))
            with trio.fail_after(60):
                try:
                    out = await session.step(torch.randn(1, tokens, HIDDEN), torch.ones(1, tokens))
                except InferenceError as exc:
                    event(f"client: InferenceError {exc.code}")
                else:
                    event(f"client: {'relayed' if relay else 'pushed'} step through {hops} hops")
                    assert list(out.shape) == [1, tokens, HIDDEN] and out.dtype in p.FLOAT_DTYPES
                    assert len(session.tapped) == 1
                    assert all(isinstance(d, bytes) and len(d) == 16 for d in session.tapped[0].in_digests)
            assert all(hop < hops - 1 and step == 1 for hop, step in session._taps)

        run_virtual(main)

    run()
