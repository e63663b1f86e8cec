"""NAT traversal pieces on 127.0.0.1 (no root needed): dial-back reachability, our relay, punching.

Real libp2p hosts in one trio loop. The NAT itself is only simulated by what each piece is told
(a port nobody listens on is "behind a NAT"); tests/test_nat.py runs the same code through real
nftables NATs in network namespaces.
"""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack

import pytest
import trio

from molink.crypto.identity import Identity
from molink.dht.direct import DIRECT_PROTOCOL, framed_data_stream, open_data_stream
from molink.dht.holepunch import PUNCH_ENV, PunchingDirectListener, transport_kind
from molink.dht.host import connect_peer, p2p_addrs, running_host, set_protocol_handler
from molink.dht.nat import NatConfig, NatService, RelayReservations
from molink.dht.reachability import PRIVATE, PUBLIC, DialbackHelper, ask_dialback, check_reachability
from molink.dht.relay import RelayedListener, RelayLimits, RelayService
from molink.dht.streams import ClosedByPeer, FramedStream, framed_handler
from molink.dht.wire import Frame

LOCAL = "/ip4/127.0.0.1/tcp/0"
ECHO = "/molink/test/echo-nat/1"


async def echo(framed: FramedStream) -> None:
    while True:
        try:
            frame = await framed.receive()
        except ClosedByPeer:
            return
        await framed.send(Frame("echo", frame.request_id, frame.body))


def full_addr(host) -> str:
    return str(p2p_addrs(host)[0])


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def hosts(stack: AsyncExitStack, n: int):
    return [await stack.enter_async_context(running_host(Identity.generate().keypair, [LOCAL])) for _ in range(n)]


async def test_dialback_tells_public_from_private():
    async with AsyncExitStack() as stack:
        helper, asker, stranger = await hosts(stack, 3)
        DialbackHelper(helper).register()
        await connect_peer(asker, full_addr(helper))
        with trio.fail_after(10):
            public = await check_reachability(asker, [helper.get_id()])
            assert public.status == PUBLIC and public.observed_ip == "127.0.0.1", public
            # a port that does not answer (what a NAT's dropped SYN looks like, only faster)
            private = await check_reachability(asker, [helper.get_id()], [f"/ip4/127.0.0.1/tcp/{dead_port()}"])
            assert private.status == PRIVATE, private
            # a port that answers but is not us (no Noise handshake with our key) does not count
            stranger_port = int(full_addr(stranger).split("/tcp/")[1].split("/")[0])
            impostor = await check_reachability(asker, [helper.get_id()], [f"/ip4/127.0.0.1/tcp/{stranger_port}"])
            assert impostor.status == PRIVATE, impostor
            # rate limit: the burst (3 requests per IP) is spent
            assert await ask_dialback(asker, helper.get_id(), [dead_port()]) is None


async def test_relay_carries_concurrent_circuits_and_survives_one_closing(nursery):
    async with AsyncExitStack() as stack:
        relay, nated, client, other, stranger = await hosts(stack, 5)
        service = RelayService(relay, RelayLimits(circuit_bytes=1 << 20))
        service.register()
        listener = RelayedListener(nated)
        listener.register()
        set_protocol_handler(nated, ECHO, framed_handler(echo))
        reservations = RelayReservations(nated, listener, lambda: [full_addr(relay)], wanted=1)
        assert await reservations.check()
        [relayed] = reservations.addrs()
        assert "/p2p-circuit/p2p/" in relayed and relayed.endswith(nated.get_id().to_base58())

        async def ask(host, payload: bytes) -> bytes:
            stream = await open_data_stream(host, nated.get_id(), [relayed], ECHO, direct=False)
            async with framed_data_stream(stream) as framed:
                return (await framed.request(Frame("x", 1, {"p": payload}), timeout=5)).body["p"]

        with trio.fail_after(20):
            await connect_peer(client, relayed)
            await connect_peer(other, relayed)
            assert service.open_circuits == 2
            assert await ask(client, b"a") == b"a" and await ask(other, b"b") == b"b"
            await client.disconnect(nated.get_id())  # one circuit ends ...
            while service.open_circuits != 1:
                await trio.sleep(0.05)
            assert await ask(other, b"c" * 1000) == b"c" * 1000  # ... the other carries on
            # the byte limit resets the circuit
            with pytest.raises(Exception):
                await ask(other, b"d" * (2 << 20))
            while service.open_circuits:
                await trio.sleep(0.05)
            # no reservation, no circuit; a relay never dials on a stranger's behalf
            fake = f"{full_addr(relay)}/p2p-circuit/p2p/{stranger.get_id().to_base58()}"
            with pytest.raises(Exception):
                await connect_peer(client, fake, timeout=5)


async def test_reservation_limits_and_relay_replacement():
    async with AsyncExitStack() as stack:
        relay1, relay3, a, b = await hosts(stack, 4)
        async with running_host(Identity.generate().keypair, [LOCAL]) as relay2:
            for relay in (relay1, relay2, relay3):
                RelayService(relay, RelayLimits(max_reservations=1)).register()
            candidates = [full_addr(relay1), full_addr(relay2), full_addr(relay3)]
            ra = RelayReservations(a, RelayedListener(a), lambda: candidates[:1], wanted=1)
            rb = RelayReservations(b, RelayedListener(b), lambda: candidates[:1], wanted=1)
            assert await ra.check() and not await rb.check()  # relay1's only slot is taken
            rb.candidates = lambda: candidates[:2]
            assert await rb.check() and list(rb.active) == [relay2.get_id()]
            assert rb.listener.relays == {relay2.get_id()}
        # relay2 left: b notices on its next round and moves to relay3 (relay1 is still full)
        rb.candidates = lambda: candidates
        with trio.fail_after(10):
            while relay2.get_id() in rb.active:
                await rb.check()
                await trio.sleep(0.05)
        assert list(rb.active) == [relay3.get_id()] and rb.addrs()[0].startswith(candidates[2])


async def test_hole_punched_data_channel(monkeypatch, nursery):
    async with AsyncExitStack() as stack:
        relay, nated, client = await hosts(stack, 3)
        RelayService(relay).register()
        nat = NatService(nated, [full_addr(relay)], NatConfig(mode=PRIVATE, relays_wanted=1))
        await nursery.start(nat.run)
        handler = framed_handler(echo)
        set_protocol_handler(nated, ECHO, handler)
        listener = PunchingDirectListener({ECHO: handler}, "127.0.0.1", host=nated)
        await nursery.start(listener.run)
        set_protocol_handler(nated, DIRECT_PROTOCOL, framed_handler(listener.handle_ticket_request))
        addrs = nat.announce_addrs(["/ip4/127.0.0.1/tcp/1"])
        assert addrs and all("/p2p-circuit" in a for a in addrs)
        with trio.fail_after(20):
            await connect_peer(client, addrs)
            for punch, kind in (("1", "punched"), ("0", "relayed")):
                monkeypatch.setenv(PUNCH_ENV, punch)
                stream = await open_data_stream(client, nated.get_id(), addrs, ECHO)
                assert transport_kind(stream) == kind
                async with framed_data_stream(stream) as framed:
                    reply = await framed.request(Frame("x", 1, {"p": b"hi"}), timeout=5)
                assert reply.body["p"] == b"hi"
        assert listener.punched == 1
