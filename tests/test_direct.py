"""Direct data channels (dht/direct.py): the hot path on plain TCP, keyed through libp2p.

Real libp2p hosts and real sockets on 127.0.0.1. The channel must carry frames exactly like a
libp2p stream, stay private and authenticated (tickets single-use and bound to a secret only the
libp2p-authenticated dialer saw), refuse junk without harming anyone else, and fall back to libp2p
streams when the peer offers no direct channel.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from molink.crypto.identity import Identity
from molink.dht.direct import (
    DIRECT_PROTOCOL,
    HELLO,
    LANE_MAGIC,
    MAGIC,
    RECORD_HEADER,
    DirectChannel,
    DirectChannelError,
    DirectListener,
    _channel_keys,
    _connect_times,
    _note_connect_time,
    is_long_path,
    _lane_hello,
    _request_ticket,
    dial_framed_direct,
    open_direct_channel,
    lanes_for,
    tcp_ip_of,
)
from molink.dht.host import connect_peer, p2p_addrs, running_host, set_protocol_handler
from molink.dht.streams import ClosedByPeer, FramedStream, framed_handler
from molink.dht.wire import Frame

ECHO = "/molink/test/echo-direct/1"
LOCAL = "/ip4/127.0.0.1/tcp/0"
TEST_TIMEOUT = 10.0


async def echo(framed: FramedStream) -> None:
    """Echo every frame, tagged with how it arrived."""
    while True:
        try:
            frame = await framed.receive()
        except ClosedByPeer:
            return
        transport = "direct" if isinstance(framed.stream, DirectChannel) else "libp2p"
        await framed.send(Frame("echo", frame.request_id, {**frame.body, "via": transport}))


class Pair:
    """A serving host (echo over libp2p and, unless `offer_direct` is off, over direct channels)
    and a dialing host, connected."""

    def __init__(self, server, client, listener):
        self.server, self.client, self.listener = server, client, listener

    @property
    def server_addrs(self) -> list[str]:
        return [str(a).split("/p2p/")[0] for a in p2p_addrs(self.server)]


async def start_pair(nursery: trio.Nursery, stack, offer_direct: bool = True) -> Pair:
    server = await stack.enter_async_context(running_host(Identity.generate().keypair, [LOCAL]))
    client = await stack.enter_async_context(running_host(Identity.generate().keypair, [LOCAL]))
    handler = framed_handler(echo)
    set_protocol_handler(server, ECHO, handler)
    listener = None
    if offer_direct:
        listener = DirectListener({ECHO: handler}, "127.0.0.1")
        await nursery.start(listener.run)
        set_protocol_handler(server, DIRECT_PROTOCOL, framed_handler(listener.handle_ticket_request))
    await connect_peer(client, [str(a) for a in p2p_addrs(server)])
    return Pair(server, client, listener)


@pytest.fixture
async def pair(nursery):
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        yield await start_pair(nursery, stack)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def libp2p_only_pair(nursery):
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        yield await start_pair(nursery, stack, offer_direct=False)
        nursery.cancel_scope.cancel()


async def roundtrip(pair: Pair, payload: bytes, **options) -> dict:
    async with dial_framed_direct(pair.client, pair.server.get_id(), pair.server_addrs, ECHO, **options) as framed:
        reply = await framed.request(Frame("data", 1, {"payload": payload}))
    return reply.body


# ---------------------------------------------------------------------- carrying frames


async def test_frames_travel_over_the_direct_channel(pair):
    with trio.fail_after(TEST_TIMEOUT):
        body = await roundtrip(pair, b"hello")
    assert body == {"payload": b"hello", "via": "direct"}


async def test_large_frames_are_split_into_records_and_arrive_whole(pair):
    payload = os.urandom(5 * 1024 * 1024 + 7)  # > 5 records of 1 MiB
    with trio.fail_after(TEST_TIMEOUT):
        body = await roundtrip(pair, payload)
    assert body["payload"] == payload and body["via"] == "direct"


async def test_many_sessions_leave_no_tickets_or_sockets(pair):
    with trio.fail_after(TEST_TIMEOUT * 3):
        for index in range(30):
            assert (await roundtrip(pair, index.to_bytes(2, "big")))["via"] == "direct"
    assert pair.listener._tickets == {}  # every ticket was spent by its session


async def test_without_a_direct_offer_the_libp2p_stream_is_used(libp2p_only_pair):
    with trio.fail_after(TEST_TIMEOUT):
        body = await roundtrip(libp2p_only_pair, b"x")
    assert body["via"] == "libp2p"


async def test_client_can_opt_out_of_direct_channels(pair):
    with trio.fail_after(TEST_TIMEOUT):
        body = await roundtrip(pair, b"x", direct=False)
    assert body["via"] == "libp2p"


async def test_unreachable_direct_port_falls_back_to_libp2p(pair):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        pair.listener.port = closed.getsockname()[1]
    with trio.fail_after(TEST_TIMEOUT):
        body = await roundtrip(pair, b"x")
    assert body["via"] == "libp2p"


# ---------------------------------------------------------------------- lanes (striping over TCP connections)


async def echo_lanes(framed: FramedStream) -> None:
    """Echo, and say how many TCP connections the serving side's channel stripes over."""
    while True:
        try:
            frame = await framed.receive()
        except ClosedByPeer:
            return
        await framed.send(Frame("echo", frame.request_id, {**frame.body, "lanes": len(framed.stream.lanes)}))


LANES_ECHO = "/molink/test/lanes/1"


@pytest.fixture
async def lanes_pair(pair, monkeypatch):
    handler = framed_handler(echo_lanes)
    pair.listener.handlers[LANES_ECHO] = handler
    set_protocol_handler(pair.server, LANES_ECHO, handler)
    return pair


@pytest.mark.parametrize("lanes", [2, 5])
async def test_a_channel_striped_over_lanes_carries_frames_of_every_size_in_order(lanes_pair, monkeypatch, lanes):
    monkeypatch.setenv("MOLINK_DIRECT_LANES", str(lanes))
    payloads = [b"", b"x", os.urandom(4095), os.urandom(4097), os.urandom(50_000), os.urandom(3 * 1024 * 1024 + 3)]
    with trio.fail_after(TEST_TIMEOUT):
        async with dial_framed_direct(lanes_pair.client, lanes_pair.server.get_id(), lanes_pair.server_addrs,
                                      LANES_ECHO) as framed:
            assert len(framed.stream.lanes) == lanes
            for index, payload in enumerate(payloads * 2):
                reply = await framed.request(Frame("data", index + 1, {"payload": payload}))
                assert reply.body == {"payload": payload, "lanes": lanes}
    assert lanes_pair.listener._tickets == {}


def test_lanes_follow_the_round_trip_unless_told():
    assert lanes_for(0.0002) == 1  # loopback, a LAN: slow start costs nothing worth a socket
    assert lanes_for(0.040) > 4  # a WAN round trip
    _connect_times.clear()


def test_a_path_is_long_only_while_every_connect_to_it_was_slow():
    """One slow connect (a loaded box's scheduling delay) must not make loopback a WAN for good: a peer
    would then share push channels and stripe lanes to its neighbour on the same machine."""
    _connect_times.clear()
    lan, wan = ["/ip4/10.0.0.2/tcp/4001"], ["/ip4/10.0.9.9/tcp/4001"]
    _note_connect_time("127.0.0.1", 0.030)
    assert not is_long_path(["/ip4/127.0.0.1/tcp/4001"])
    assert not is_long_path(lan)  # never connected: unknown is short
    _note_connect_time("10.0.0.2", 0.030)
    _note_connect_time("10.0.9.9", 0.030)
    assert is_long_path(lan) and is_long_path(wan)
    _note_connect_time("10.0.0.2", 0.0003)  # a quicker sample: the first was noise
    _note_connect_time("10.0.9.9", 0.041)
    assert not is_long_path(lan) and is_long_path(wan)
    _connect_times.clear()


async def test_a_missing_lane_fails_the_channel_and_spends_the_ticket(lanes_pair, monkeypatch):
    monkeypatch.setattr("molink.dht.direct.HANDSHAKE_TIMEOUT", 0.5)
    pair = lanes_pair
    with trio.fail_after(TEST_TIMEOUT):
        port, ticket, secret = await _request_ticket(pair.client, pair.server.get_id(), LANES_ECHO, 3.0)
        to_listener, to_dialer = _channel_keys(secret, ticket)
        channel = DirectChannel(await raw_connect(pair), to_listener, to_dialer)
        await channel.socket.send_all(MAGIC + ticket + channel.seal(HELLO + bytes([3])))  # 3 lanes promised
        lane = await raw_connect(pair)  # ... only lane 1 comes
        hello = _lane_hello(secret, ticket, 1)
        await lane.send_all(LANE_MAGIC + ticket + b"\x01" + RECORD_HEADER.pack(len(hello)) + hello)
        assert await channel.read_record() is None  # no welcome: hung up
        assert await lane.receive_some(10) == b""  # the lane that came is let go too
        await lane.aclose()
        await channel.aclose_socket(drain=False)
        assert ticket not in pair.listener._tickets
        assert (await roundtrip(pair, b"others unaffected"))["via"] == "direct"


async def test_a_lane_without_the_secret_is_refused(lanes_pair):
    pair = lanes_pair
    with trio.fail_after(TEST_TIMEOUT):
        port, ticket, secret = await _request_ticket(pair.client, pair.server.get_id(), LANES_ECHO, 3.0)
        lane = await raw_connect(pair)
        forged = _lane_hello(os.urandom(32), ticket, 1)
        await lane.send_all(LANE_MAGIC + ticket + b"\x01" + RECORD_HEADER.pack(len(forged)) + forged)
        assert await lane.receive_some(10) == b""
        await lane.aclose()
        assert ticket in pair.listener._tickets and not pair.listener._tickets[ticket].extra


# ---------------------------------------------------------------------- hostile input


async def raw_connect(pair: Pair) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", pair.listener.port)


async def test_a_ticket_is_single_use(pair):
    with trio.fail_after(TEST_TIMEOUT):
        port, ticket, secret = await _request_ticket(pair.client, pair.server.get_id(), ECHO, 3.0)
        to_listener, to_dialer = _channel_keys(secret, ticket)
        for attempt in range(2):
            sock = await raw_connect(pair)
            channel = DirectChannel(sock, to_listener, to_dialer)
            await sock.send_all(MAGIC + ticket + channel.seal(HELLO))
            if attempt == 0:
                assert (await channel.read_record()).startswith(b"molink-direct welcome")
                await channel.aclose_socket(drain=False)
            else:  # the replayed ticket is refused: the listener just hangs up
                with pytest.raises((DirectChannelError, trio.BrokenResourceError, OSError)):
                    assert await channel.read_record() is None
                    raise DirectChannelError("closed")
                await channel.aclose_socket(drain=False)


async def test_a_ticket_without_its_secret_is_refused_and_stays_unspent(pair):
    with trio.fail_after(TEST_TIMEOUT):
        port, ticket, secret = await _request_ticket(pair.client, pair.server.get_id(), ECHO, 3.0)
        wrong = DirectChannel(await raw_connect(pair), *_channel_keys(os.urandom(32), ticket))
        await wrong.socket.send_all(MAGIC + ticket + wrong.seal(HELLO))
        assert await wrong.read_record() is None  # hung up on
        await wrong.aclose_socket(drain=False)
        assert ticket in pair.listener._tickets  # a thief cannot burn the rightful dialer's ticket


@pytest.mark.parametrize("junk", [b"", b"GET / HTTP/1.1\r\n\r\n", MAGIC + os.urandom(16) + b"\x00\x00\x00\x20" + os.urandom(32),
                                  os.urandom(4096)])
async def test_junk_on_the_direct_port_harms_nobody(pair, junk):
    with trio.fail_after(TEST_TIMEOUT):
        sock = await raw_connect(pair)
        try:
            await sock.send_all(junk)
            await sock.send_eof()
            assert await sock.receive_some(100) == b""  # closed on us, nothing said
        except trio.BrokenResourceError:
            pass  # ... or reset before we finished talking
        await sock.aclose()
        assert (await roundtrip(pair, b"still fine"))["via"] == "direct"


async def test_a_silent_socket_is_dropped_after_the_handshake_deadline(pair, monkeypatch):
    monkeypatch.setattr("molink.dht.direct.HANDSHAKE_TIMEOUT", 0.3)
    with trio.fail_after(TEST_TIMEOUT):
        sock = await raw_connect(pair)
        assert await sock.receive_some(100) == b""
        await sock.aclose()


async def assert_hung_up(channel: DirectChannel) -> None:
    try:
        assert await channel.read(10) == b""
    except DirectChannelError as exc:
        assert "reset" in str(exc)
    await channel.aclose_socket(drain=False)


async def test_a_tampered_record_fails_the_channel(pair):
    with trio.fail_after(TEST_TIMEOUT):
        channel = await open_direct_channel(pair.client, pair.server.get_id(), "127.0.0.1", ECHO)
        sealed = bytearray(channel.seal(b"\x00\x00\x00\x05hello"))
        sealed[-1] ^= 1
        await channel.socket.send_all(bytes(sealed))
        await assert_hung_up(channel)  # the listener failed the channel: no reply
        assert (await roundtrip(pair, b"others unaffected"))["via"] == "direct"


async def test_oversized_record_header_is_refused_before_reading(pair):
    with trio.fail_after(TEST_TIMEOUT):
        channel = await open_direct_channel(pair.client, pair.server.get_id(), "127.0.0.1", ECHO)
        await channel.socket.send_all(b"\xff\xff\xff\xff")
        await assert_hung_up(channel)


async def test_tickets_only_for_the_offered_protocols(pair):
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(DirectChannelError, match="no direct channel"):
        await _request_ticket(pair.client, pair.server.get_id(), "/molink/other/1", 3.0)


def test_direct_ip_is_taken_from_plain_tcp_addresses_only():
    assert tcp_ip_of(["/ip4/10.0.0.1/tcp/4001"]) == "10.0.0.1"
    assert tcp_ip_of(["/ip4/1.2.3.4/tcp/1/p2p/12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK/p2p-circuit",
                      "/ip6/::1/tcp/5"]) == "::1"
    assert tcp_ip_of(["/ip4/1.2.3.4/udp/1/quic-v1", "garbage"]) is None
