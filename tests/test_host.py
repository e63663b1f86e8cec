"""Real libp2p hosts on 127.0.0.1: the hardened host factory and FramedStream (dht/host.py,
dht/streams.py). Every test is bounded by trio.fail_after so a regression fails instead of hanging."""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p import new_swarm
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.io import NoiseTransportReadWriter
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP

from molink.dht.host import (
    ConnectError,
    ListenError,
    connect_peer,
    create_host,
    p2p_addrs,
    running_host,
    set_protocol_handler,
)
from molink.dht.streams import (
    ClosedByPeer,
    FramedStream,
    PeerUnresponsive,
    PeerVanished,
    ReceiveOverflow,
    ReceiveTimeout,
    StreamClosedError,
    StreamOpenError,
    TruncatedFrame,
    dial_framed,
    framed_handler,
    open_framed_stream,
)
from molink.dht.wire import Frame, FrameTooLarge, WireLimits, encode_frame

ECHO = "/molink/test/echo/1"
LOCAL = "/ip4/127.0.0.1/tcp/0"
TEST_TIMEOUT = 5.0


async def echo_until_goodbye(framed: FramedStream) -> None:
    while True:
        try:
            frame = await framed.receive(timeout=TEST_TIMEOUT)
        except ClosedByPeer:
            return
        await framed.send(Frame("echo", frame.request_id, frame.body))


@asynccontextmanager
async def server_and_client(**server_handlers) -> AsyncIterator[tuple[BasicHost, BasicHost]]:
    """Two hosts, the client connected to the server; server_handlers: protocol -> handler."""
    async with running_host(create_new_key_pair()) as server:
        set_protocol_handler(server, ECHO, framed_handler(echo_until_goodbye))
        for protocol, handler in server_handlers.items():
            set_protocol_handler(server, protocol, handler)
        async with running_host(create_new_key_pair()) as client:
            await connect_peer(client, p2p_addrs(server))
            yield server, client


def plaintext_only_host() -> BasicHost:
    """What trap 1 is about: a host offering only /plaintext/2.0.0 (built with raw libp2p)."""
    key_pair = create_new_key_pair()
    swarm = new_swarm(
        key_pair=key_pair,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        transports=[TCP()],
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        retry_config=RetryConfig(max_retries=0),
    )
    return BasicHost(network=swarm)


def task_names() -> list[str]:
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return sorted(names)


# ------------------------------------------------------------------------------ host


async def test_noise_yamux_connection_exchanges_frames() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client() as (server, client):
            (conn,) = client.get_network().get_connections(server.get_id())
            assert isinstance(conn.muxed_conn, Yamux)
            assert isinstance(conn.muxed_conn.secured_conn.conn, NoiseTransportReadWriter)
            upgrader = server.get_network().upgrader
            assert list(upgrader.security_multistream.transports) == ["/noise"]
            assert list(upgrader.muxer_multistream.transports) == ["/yamux/1.0.0"]

            async with dial_framed(client, server.get_id(), ECHO) as framed:
                for body in ({"n": 1}, {"blob": os.urandom(100_000)}, {}):
                    request = Frame("req", framed.next_request_id(), body)
                    reply = await framed.request(request, timeout=2)
                    assert (reply.type, reply.request_id, reply.body) == ("echo", request.request_id, body)
            assert isinstance(framed.error, StreamClosedError)


async def test_plaintext_only_peer_is_refused() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with running_host(create_new_key_pair()) as ours:
            plain = plaintext_only_host()
            async with plain.run([multiaddr.Multiaddr(LOCAL)]):
                try:
                    # It dials us: security negotiation finds no common protocol.
                    with pytest.raises(Exception) as refused:
                        await plain.connect(info_from_p2p_addr(p2p_addrs(ours)[0]))
                    assert "connect" in str(refused.value)
                    assert plain.get_id() not in ours.get_network().connections
                    # We dial it: same refusal, as our typed error.
                    with pytest.raises(ConnectError):
                        await connect_peer(ours, p2p_addrs(plain), timeout=2)
                finally:
                    await plain.close()
            # Our host is unharmed: a Noise peer still gets in.
            async with running_host(create_new_key_pair()) as friend:
                assert await connect_peer(friend, p2p_addrs(ours)) == ours.get_id()


async def test_raising_handler_does_not_take_the_host_down() -> None:
    async def boom(framed: FramedStream) -> None:
        await framed.receive(timeout=2)
        raise RuntimeError("handler bug")

    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**{"/molink/test/boom/1": framed_handler(boom)}) as (server, client):
            (conn_before,) = client.get_network().get_connections(server.get_id())
            for _ in range(2):  # the handler stays registered and keeps failing safely
                async with dial_framed(client, server.get_id(), "/molink/test/boom/1") as framed:
                    await framed.send(Frame("req", 1, {}))
                    with pytest.raises(StreamClosedError):
                        await framed.receive(timeout=2)
            async with dial_framed(client, server.get_id(), ECHO) as framed:
                reply = await framed.request(Frame("req", 7, {"ok": True}), timeout=2)
                assert reply.body == {"ok": True}
            assert client.get_network().get_connections(server.get_id()) == [conn_before]


async def test_handler_that_returns_gets_its_stream_closed() -> None:
    async def forgetful(stream) -> None:
        return None  # neither reads nor closes

    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**{"/molink/test/forget/1": forgetful}) as (server, client):
            async with dial_framed(client, server.get_id(), "/molink/test/forget/1") as framed:
                with pytest.raises(PeerVanished):  # EOF, no goodbye frame
                    await framed.receive(timeout=2)


async def test_close_leaves_no_listener_tasks_or_fds() -> None:
    gc.collect()
    tasks_before, fds_before = task_names(), len(os.listdir("/proc/self/fd"))
    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client() as (server, client):
            port = int(server.get_transport_addrs()[0].value_for_protocol("tcp"))
            async with dial_framed(client, server.get_id(), ECHO) as framed:
                await framed.request(Frame("req", 1, {}), timeout=2)
            probe = socket.socket()
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):  # control: the port is taken while the host runs
                probe.bind(("127.0.0.1", port))
                probe.listen()
            probe.close()
    await trio.sleep(0.05)  # let cancelled tasks finish unwinding
    gc.collect()
    # SO_REUSEADDR lets us past TIME_WAIT sockets, not past a live listener.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()
    assert task_names() == tasks_before
    assert len(os.listdir("/proc/self/fd")) == fds_before


async def test_busy_port_raises_listen_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with trio.fail_after(TEST_TIMEOUT), pytest.raises(ListenError):
            async with running_host(create_new_key_pair(), [f"/ip4/127.0.0.1/tcp/{port}"]):
                pass


def test_factory_refuses_non_tcp_addresses_and_non_ed25519_keys() -> None:
    with pytest.raises(ValueError):
        create_host(create_new_key_pair(), ["/ip4/127.0.0.1/udp/0/quic-v1"])
    with pytest.raises(ValueError):
        create_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0/ws"])
    with pytest.raises(TypeError):
        create_host(create_secp256k1_key_pair(), [LOCAL])


async def test_reconnect_to_peer_restarted_on_new_port() -> None:
    """Trap 6: without clearing the old address and the negative cache this takes 60 s."""
    server_key = create_new_key_pair()
    with trio.fail_after(TEST_TIMEOUT):
        async with running_host(create_new_key_pair()) as client:
            async with running_host(server_key) as server:
                peer_id = server.get_id()
                old_addrs = p2p_addrs(server)
                await connect_peer(client, old_addrs)
            while client.get_network().get_connections(peer_id):
                await trio.sleep(0.01)
            with pytest.raises(ConnectError):
                await connect_peer(client, old_addrs, timeout=2)
            async with running_host(server_key) as restarted:
                new_addrs = p2p_addrs(restarted)
                assert new_addrs != old_addrs
                # What libp2p alone does here: refuses from its negative cache.
                client.get_network()._negative_peer_cache.mark_failed(str(peer_id))
                assert await connect_peer(client, new_addrs, timeout=2) == peer_id
                # Negotiation reaches the restarted peer (which has no echo handler).
                with pytest.raises(StreamOpenError, match="not supported"):
                    async with dial_framed(client, peer_id, ECHO):
                        pass


async def test_inbound_slots_are_released_when_connections_close() -> None:
    """libp2p keeps each inbound handler task (and its slot of max - min connections) until the
    host stops; with 3 slots the 4th connect would be refused without our fix."""
    config = ConnectionConfig(
        max_connections=53, min_connections=50, low_watermark=50, high_watermark=53,
        max_connections_per_peer=1,
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with running_host(create_new_key_pair(), connection_config=config) as server:
            set_protocol_handler(server, ECHO, framed_handler(echo_until_goodbye))
            async with running_host(create_new_key_pair()) as client:
                for i in range(6):
                    peer_id = await connect_peer(client, p2p_addrs(server), timeout=2)
                    async with dial_framed(client, peer_id, ECHO) as framed:
                        await framed.request(Frame("req", i, {}), timeout=2)
                    await client.disconnect(peer_id)
                    while server.get_network().get_connections(client.get_id()):
                        await trio.sleep(0.01)


# ------------------------------------------------------------------------------ streams


async def test_receive_deadline_fires_on_silent_peer() -> None:
    async def silent(stream) -> None:
        await trio.sleep(TEST_TIMEOUT)

    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**{"/molink/test/silent/1": silent}) as (server, client):
            async with dial_framed(client, server.get_id(), "/molink/test/silent/1") as framed:
                start = trio.current_time()
                with pytest.raises(ReceiveTimeout):
                    await framed.receive(timeout=0.3)
                assert 0.3 <= trio.current_time() - start < 1.0
                assert framed.error is None  # a receive timeout alone does not kill the stream


async def test_heartbeat_detects_frozen_peer_and_keeps_live_one() -> None:
    async def frozen(stream) -> None:  # like SIGSTOP: connection up, nothing answers
        await trio.sleep(TEST_TIMEOUT)

    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**{"/molink/test/frozen/1": frozen}) as (server, client):
            options = {"heartbeat_interval": 0.1, "heartbeat_timeout": 0.4}
            async with dial_framed(client, server.get_id(), "/molink/test/frozen/1", **options) as framed:
                start = trio.current_time()
                with pytest.raises(PeerUnresponsive):
                    await framed.receive(timeout=3)
                assert trio.current_time() - start < 1.0
            async with dial_framed(client, server.get_id(), ECHO, **options) as framed:
                with pytest.raises(ReceiveTimeout):  # 0.8 s of app silence, pongs keep it alive
                    await framed.receive(timeout=0.8)
                assert framed.error is None and framed.rtt is not None and framed.rtt < 0.1


async def test_oversized_length_prefix_gets_typed_error() -> None:
    async def liar(stream) -> None:
        await stream.write(b"\xff\xff\xff\xff" + b"x" * 100)
        await trio.sleep(TEST_TIMEOUT)

    async def big(framed: FramedStream) -> None:
        await framed.send(Frame("big", 1, {"data": b"x" * 4096}))
        await trio.sleep(TEST_TIMEOUT)

    handlers = {"/molink/test/liar/1": liar, "/molink/test/big/1": framed_handler(big)}
    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**handlers) as (server, client):
            async with dial_framed(client, server.get_id(), "/molink/test/liar/1") as framed:
                with pytest.raises(FrameTooLarge):
                    await framed.receive(timeout=2)
            limits = WireLimits(max_frame_bytes=1024)
            async with dial_framed(client, server.get_id(), "/molink/test/big/1", limits=limits) as framed:
                with pytest.raises(FrameTooLarge):
                    await framed.receive(timeout=2)
                with pytest.raises(FrameTooLarge):  # it stays failed
                    await framed.send(Frame("req", 1, {}))


async def test_eof_is_classified_by_framing() -> None:
    async def truncate(stream) -> None:
        await stream.write(encode_frame(Frame("x", 1, {"data": b"y" * 1000}))[:500])
        await stream.close()

    async def vanish(stream) -> None:  # a whole frame, then EOF without a goodbye
        await stream.write(encode_frame(Frame("x", 1, {})))
        await stream.close()

    async def goodbye(framed: FramedStream) -> None:
        await framed.send(Frame("x", 1, {}))

    handlers = {
        "/molink/test/truncate/1": truncate,
        "/molink/test/vanish/1": vanish,
        "/molink/test/goodbye/1": framed_handler(goodbye),
    }
    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**handlers) as (server, client):
            async with dial_framed(client, server.get_id(), "/molink/test/truncate/1") as framed:
                with pytest.raises(TruncatedFrame):
                    await framed.receive(timeout=2)
            for protocol, ending in (("vanish", PeerVanished), ("goodbye", ClosedByPeer)):
                async with dial_framed(client, server.get_id(), f"/molink/test/{protocol}/1") as framed:
                    assert (await framed.receive(timeout=2)).type == "x"
                    with pytest.raises(ending):
                        await framed.receive(timeout=2)


async def test_slow_consumer_overflows_instead_of_stalling() -> None:
    async def flood(framed: FramedStream) -> None:
        for i in range(50):
            await framed.send(Frame("x", i, {"data": b"z" * 1000}))
        await trio.sleep(TEST_TIMEOUT)

    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**{"/molink/test/flood/1": framed_handler(flood)}) as (server, client):
            async with dial_framed(client, server.get_id(), "/molink/test/flood/1", max_queued_frames=4) as framed:
                await trio.sleep(0.3)  # a busy consumer
                received = []
                with pytest.raises(ReceiveOverflow):
                    while True:
                        received.append((await framed.receive(timeout=2)).request_id)
                assert received == [0, 1, 2, 3]  # what was queued is still delivered, in order


async def test_reserved_types_and_run_twice() -> None:
    async def idle(stream) -> None:
        await trio.sleep(TEST_TIMEOUT)

    with trio.fail_after(TEST_TIMEOUT):
        async with server_and_client(**{"/molink/test/idle/1": idle}) as (server, client):
            raw = await client.new_stream(server.get_id(), [TProtocol("/molink/test/idle/1")])
            async with open_framed_stream(raw) as framed:
                for reserved in ("ping", "pong", "eos"):
                    with pytest.raises(ValueError):
                        await framed.send(Frame(reserved, 1, {}))
                with pytest.raises(RuntimeError):
                    await framed.run()


async def test_running_host_raises_the_body_exception_itself() -> None:
    with trio.fail_after(TEST_TIMEOUT), pytest.raises(KeyError):
        async with running_host(create_new_key_pair()):
            raise KeyError("from the body, not an ExceptionGroup")


@pytest.mark.slow
async def test_busy_consumer_does_not_stall_the_sender() -> None:
    """Trap 3: yamux resets a writer whose window stays shut for 5 s. The reader task keeps
    draining while the consumer is busy for 6 s, so 10 MB arrive intact."""
    chunk = os.urandom(256 * 1024)

    async def push(framed: FramedStream) -> None:
        for i in range(40):
            await framed.send(Frame("x", i, {"data": chunk}), timeout=10)
        with pytest.raises(ClosedByPeer):  # wait for the client's goodbye
            await framed.receive(timeout=20)

    with trio.fail_after(30):
        async with server_and_client(**{"/molink/test/push/1": framed_handler(push)}) as (server, client):
            async with dial_framed(client, server.get_id(), "/molink/test/push/1") as framed:
                await trio.sleep(6)
                for i in range(40):
                    frame = await framed.receive(timeout=5)
                    assert frame.request_id == i and frame.body["data"] == chunk
