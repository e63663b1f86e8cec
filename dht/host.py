"""A hardened py-libp2p 0.8.1 host: TCP + Noise + yamux only, handlers that cannot kill it.

Every choice here answers a trap measured on this machine (see DESIGN.md §3):
- trap 1: `new_host()` offers /plaintext/2.0.0, secio and TLS besides Noise. We pass a security
  map holding Noise alone, so a peer that cannot speak Noise fails the security handshake.
- trap 9: mplex deadlocks on full-duplex traffic, so the muxer map holds yamux alone.
- connect takes 252 ms with the default `max_connections_per_peer=3` (happy-eyeballs waits for
  more dials); 1 makes it ~5 ms.
- trap 2: an exception in a stream handler escapes into the connection's nursery and takes the
  host down, so every handler (and libp2p's own top-level negotiation handler) is guarded.
- trap 5: leaving `host.run()` leaves the listener open; `running_host` always awaits
  `host.close()`, shielded, before it returns.
- found here: every inbound TCP connection's handler task ends in `manager.wait_finished()`,
  so it outlives its connection and keeps one of the swarm's inbound slots (max_connections -
  min_connections = 250) until the host stops: after 250 inbound connections IN ITS LIFETIME a
  default host refuses every new one. `_release_inbound_slots` ends that task when its
  connection closes.
- trap 6: a failed dial puts the peer in `Swarm._negative_peer_cache` for 60 s, and the
  peerstore keeps the dead address, which the swarm keeps choosing (it dials at most ONE address
  per transport class, the first one). `connect_peer` clears both before it dials.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p import new_swarm
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP

from molink.crypto.swarm_key import SwarmKey
from molink.dht.atomic_yamux import install_atomic_yamux_writes
from molink.dht.private_swarm import PrivateSwarmTCP, dial_failure_reason

logger = logging.getLogger(__name__)

StreamHandler = Callable[[INetStream], Awaitable[None]]

DEFAULT_LISTEN_ADDR = "/ip4/127.0.0.1/tcp/0"
DEBUG_ENV = "MOLINK_DEBUG_LIBP2P"
# How long connect_peer waits for one address (TCP + Noise + yamux is ~5 ms on loopback).
DEFAULT_CONNECT_TIMEOUT = 10.0
# Bounded so that a wedged connection cannot make shutdown hang forever.
CLOSE_TIMEOUT = 5.0
# A stream reset/close on a dead connection can block on the socket write; never wait long.
STREAM_CLEANUP_TIMEOUT = 1.0


class HostError(Exception):
    """The host could not be built, started, or could not reach a peer."""


class ListenError(HostError, OSError):
    """A listen address could not be bound (libp2p's `Swarm.listen` only returns False)."""


class ConnectError(HostError):
    """No address of the peer gave a Noise-secured connection in time."""


# ---------------------------------------------------------------------------- logging


_logging_configured = False


def configure_libp2p_logging() -> None:
    """libp2p silent (CRITICAL only), into the application's logging; DEBUG when MOLINK_DEBUG_LIBP2P is set.

    `import libp2p` runs its own `setup_logging()`, which sets `propagate=False` with no handler,
    so its records bypass the application's handlers and land on stderr via logging.lastResort.
    We route them back through the normal hierarchy (the NullHandler keeps a bare script quiet
    when nobody has configured logging).
    """
    global _logging_configured
    if _logging_configured:
        return  # once per process: later, the application owns these levels
    _logging_configured = True
    root = logging.getLogger("libp2p")
    root.propagate = True
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())
    # py-libp2p logs routine events (a dead DHT contact, a refused protocol) at WARNING and
    # ERROR; our own code reports what a volunteer must know, so libp2p stays silent unless
    # MOLINK_DEBUG_LIBP2P is set.
    root.setLevel(logging.DEBUG if os.environ.get(DEBUG_ENV) else logging.CRITICAL)
    # Some modules pin their own level (auto_connector sets INFO and logs every cycle): let
    # them inherit ours instead.
    for name, child in logging.Logger.manager.loggerDict.items():
        if name.startswith("libp2p.") and isinstance(child, logging.Logger):
            child.setLevel(logging.NOTSET)


# ---------------------------------------------------------------------------- addresses


def _as_multiaddr(addr: multiaddr.Multiaddr | str) -> multiaddr.Multiaddr:
    return addr if isinstance(addr, multiaddr.Multiaddr) else multiaddr.Multiaddr(addr)


def _check_tcp_listen_addr(addr: multiaddr.Multiaddr) -> None:
    names = [p.name for p in addr.protocols()]
    if len(names) != 2 or names[0] not in ("ip4", "ip6") or names[1] != "tcp":
        # QUIC is 50x slower here and ws/webrtc are untested (trap 9): refuse, don't guess.
        raise ValueError(f"listen address must be /ip4|ip6/<ip>/tcp/<port>, got {addr}")


def p2p_addrs(host: BasicHost) -> list[multiaddr.Multiaddr]:
    """The host's dialable addresses, each ending in /p2p/<peer id>."""
    return list(host.get_addrs())


# ---------------------------------------------------------------------------- host factory

OPEN_FILES_WANTED = 65536


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (at most OPEN_FILES_WANTED): a peer holds a socket per
    session per hop, times the lanes of a long path (direct_channel.py), and desktop systems often
    start processes at a soft limit of 1024 while allowing far more."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):  # not on this OS, or not allowed: keep what we have
        pass



def create_host(
    identity_keypair: KeyPair,
    listen_addrs: Sequence[multiaddr.Multiaddr | str] = (DEFAULT_LISTEN_ADDR,),
    *,
    connection_config: ConnectionConfig | None = None,
    retry_config: RetryConfig | None = None,
    negotiate_timeout: int = 10,
    announce_addrs: Sequence[multiaddr.Multiaddr | str] | None = None,
    auto_connect: bool = False,
    swarm_key: SwarmKey | None = None,
) -> BasicHost:
    """Build (not start) a BasicHost: TCP transport, Noise security, yamux muxer, nothing else.

    With a `swarm_key` every TCP connection must prove that key before Noise starts (a private
    swarm, see molink.dht.private_swarm); without one the host only talks to keyless hosts.

    `listen_addrs` is only validated here; `running_host` binds them. `auto_connect=False`
    turns off libp2p's AutoConnector, which otherwise dials every peer in the peerstore (up to
    150 at a time, every 10-30 s) while the host has fewer than 100 connections: a MoLink peer
    connects to the peers it routes through and to DHT contacts, not to everyone it has heard of.
    """
    if not isinstance(identity_keypair.private_key, Ed25519PrivateKey):
        # Peer ids must inline the Ed25519 key: DHT records are verified against the id.
        raise TypeError("identity_keypair must be an Ed25519 libp2p KeyPair")
    addrs = [_as_multiaddr(a) for a in listen_addrs]
    for addr in addrs:
        _check_tcp_listen_addr(addr)
    configure_libp2p_logging()
    raise_open_files_limit()
    install_atomic_yamux_writes()  # a write cancelled half-way kills a Noise connection (atomic_yamux.py)

    security = {
        # A fresh X25519 static key per host is what new_host() does too; the peer's identity
        # is proven by the Ed25519 signature inside the Noise handshake payload.
        NOISE_PROTOCOL_ID: NoiseTransport(
            identity_keypair, noise_privkey=create_x25519_key_pair().private_key
        )
    }
    swarm = new_swarm(
        key_pair=identity_keypair,
        sec_opt=security,
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        # An explicit transport list disables auto-detection from addresses (no QUIC/ws).
        transports=[PrivateSwarmTCP(swarm_key) if swarm_key is not None else TCP()],
        listen_addrs=addrs,
        connection_config=connection_config or ConnectionConfig(max_connections_per_peer=1),
        # Default is 3 retries (0.1+0.2+0.4 s of sleeps); the caller's failover is faster.
        retry_config=retry_config or RetryConfig(max_retries=1, initial_delay=0.1),
    )
    host = BasicHost(
        network=swarm,
        negotiate_timeout=negotiate_timeout,
        announce_addrs=None if announce_addrs is None else [_as_multiaddr(a) for a in announce_addrs],
    )
    _release_inbound_slots(swarm)
    if not auto_connect:
        # No config value disables it (target = mean of the watermarks, and a zero high
        # watermark makes the pruner close everything), so replace its one entry point.
        swarm.auto_connector.maybe_connect = _no_auto_connect  # type: ignore[method-assign]
    # libp2p's own entry point for every inbound stream (multistream negotiation, then the
    # protocol handler) runs in the connection's nursery; guard it as a last line of defence.
    # No close on return there: some libp2p protocol handlers may hand their stream on.
    swarm.set_stream_handler(
        guard_handler(swarm.common_stream_handler, "<negotiation>", close_on_return=False)
    )
    return host


async def _no_auto_connect() -> None:
    return None


# Set only inside an inbound-connection handler task: called with the upgraded muxed connection.
_inbound_upgraded: contextvars.ContextVar[Callable[[Any], None] | None] = contextvars.ContextVar(
    "molink_inbound_upgraded", default=None
)


def _release_inbound_slots(swarm: Any) -> None:
    """Make each inbound handler task end (and free its inbound slot) when its connection closes.

    Swarm._do_handle_inbound_connection upgrades the connection, then waits for the whole swarm
    to finish. We run it under a cancel scope that a watcher cancels once the connection's
    `event_closed` (yamux) is set. The connection is learnt by wrapping
    upgrade_inbound_raw_conn, which relay/hole-punching code also calls: the context variable and
    the task check make the wrapper act only for the handler task that set it.
    """
    original_upgrade = getattr(swarm, "upgrade_inbound_raw_conn", None)
    original_handle = getattr(swarm, "_do_handle_inbound_connection", None)
    if original_upgrade is None or original_handle is None:
        logger.warning("libp2p internals changed; inbound connection slots may leak")
        return

    async def upgrade(raw_conn: Any, maddr: Any) -> Any:
        muxed = await original_upgrade(raw_conn, maddr)
        callback = _inbound_upgraded.get()
        if callback is not None:
            callback(muxed)
        return muxed

    async def handle(read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        owner = trio.lowlevel.current_task()
        async with trio.open_nursery() as nursery:

            def watch(muxed: Any) -> None:
                closed = getattr(muxed, "event_closed", None)
                # Tasks spawned from here inherit the variable: act for the owner task only.
                if closed is not None and trio.lowlevel.current_task() is owner:
                    nursery.start_soon(_cancel_when_set, closed, nursery.cancel_scope)

            token = _inbound_upgraded.set(watch)
            try:
                await original_handle(read_write_closer, maddr, failure_event)
            finally:
                _inbound_upgraded.reset(token)
                nursery.cancel_scope.cancel()

    swarm.upgrade_inbound_raw_conn = upgrade
    swarm._do_handle_inbound_connection = handle


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


@asynccontextmanager
async def running_host(
    identity_keypair: KeyPair,
    listen_addrs: Sequence[multiaddr.Multiaddr | str] = (DEFAULT_LISTEN_ADDR,),
    **kwargs: object,
) -> AsyncIterator[BasicHost]:
    """Create a host, listen on every address, yield it; on exit close it and leave nothing.

    Raises ListenError if any address cannot be bound (libp2p would silently run without it).
    """
    addrs = [_as_multiaddr(a) for a in listen_addrs]
    host = create_host(identity_keypair, addrs, **kwargs)  # type: ignore[arg-type]
    unbound: list[multiaddr.Multiaddr] = []
    try:
        # host.run() starts the swarm service in its own trio nursery and calls Swarm.listen.
        async with host.run(addrs):
            try:
                bound = host.get_transport_addrs()
                if len(bound) < len(addrs):
                    unbound = addrs
                else:
                    yield host
            finally:
                await _close_host(host)
    except BaseExceptionGroup as group:
        # libp2p's nurseries wrap whatever the body raised; hand the caller its own exception.
        leaf = _single_leaf(group)
        if leaf is group:
            raise
        raise leaf from leaf.__cause__
    if unbound:
        raise ListenError(f"could not bind all of {unbound} (is a port taken?)")


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _close_host(host: BasicHost) -> None:
    # Leaving run() alone keeps the listener open (trap 5). Shielded: this must also run when
    # the body was cancelled; bounded: a wedged connection must not hang the exit.
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        try:
            await host.close()
        except Exception:
            logger.warning("error while closing libp2p host", exc_info=True)
    if scope.cancelled_caught:
        logger.warning("libp2p host close took over %.0f s; abandoned", CLOSE_TIMEOUT)


# ---------------------------------------------------------------------------- handlers


async def _cleanup_stream(stream: INetStream, *, reset: bool) -> None:
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + STREAM_CLEANUP_TIMEOUT
        try:
            if reset:
                await stream.reset()
            elif not getattr(stream, "is_closed", False):
                await stream.close()
        except Exception:
            logger.debug("stream cleanup failed", exc_info=True)


def guard_handler(
    handler: StreamHandler, name: str, *, close_on_return: bool = True
) -> StreamHandler:
    """Wrap a stream handler so that its exceptions are logged and reset the stream, never more.

    With `close_on_return`, a handler that returns normally gets its stream closed, so a
    forgetful handler does not leave yamux bookkeeping behind. trio.Cancelled is a BaseException and still propagates: shutdown
    must be able to cancel handlers.
    """

    async def guarded(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception:
            peer = getattr(getattr(stream, "muxed_conn", None), "peer_id", "?")
            logger.warning("stream handler %s failed (peer %s); stream reset", name, peer, exc_info=True)
            await _cleanup_stream(stream, reset=True)
            return
        if close_on_return:
            await _cleanup_stream(stream, reset=False)

    guarded.__name__ = f"guarded_{getattr(handler, '__name__', 'handler')}"
    return guarded


def set_protocol_handler(
    host: BasicHost, protocol_id: str | TProtocol, handler: StreamHandler
) -> None:
    """Register `handler` for `protocol_id`, guarded (see guard_handler)."""
    host.set_stream_handler(TProtocol(protocol_id), guard_handler(handler, str(protocol_id)))


# ---------------------------------------------------------------------------- dialing


def with_peer_id(addrs: Sequence[str], peer_id: str) -> list[str]:
    """Announced addresses made dialable: each ending in /p2p/<peer id>."""
    return [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in addrs]


def forget_peer_addrs(host: BasicHost, peer_id: ID) -> None:
    """Drop the peer's known addresses and lift its 60 s dial block (trap 6)."""
    host.get_peerstore().clear_addrs(peer_id)
    # Public in 0.8.1: evicts the peer from Swarm._negative_peer_cache.
    host.get_network().unblock_peer(peer_id)


async def connect_peer(
    host: BasicHost,
    addrs: multiaddr.Multiaddr | str | Sequence[multiaddr.Multiaddr | str],
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    reconnect: bool = False,
) -> ID:
    """Connect to a peer given /.../tcp/<port>/p2p/<id> address(es); return its peer id.

    Already connected: returns at once, unless `reconnect` (use it when the peer is known to have
    restarted: the old connection may not have noticed yet). Otherwise each address is tried in
    turn, alone: the peerstore is cleared and the dial block lifted first, because libp2p would
    otherwise retry the stale address (it dials only the first TCP address it knows) or refuse
    outright for 60 s after a failure. Each address gets `timeout` seconds.
    """
    if isinstance(addrs, (str, multiaddr.Multiaddr)):
        addrs = [addrs]
    infos = [info_from_p2p_addr(_as_multiaddr(a)) for a in addrs]
    if not infos:
        raise ValueError("no address given")
    peer_id = infos[0].peer_id
    if any(info.peer_id != peer_id for info in infos):
        raise ValueError("all addresses must name the same /p2p/ peer id")
    if peer_id == host.get_id():
        raise ValueError("refusing to dial ourselves")

    if host.get_network().get_connections(peer_id):
        if not reconnect:
            return peer_id
        await host.disconnect(peer_id)

    errors: list[str] = []
    for info in infos:
        forget_peer_addrs(host, peer_id)
        try:
            with trio.fail_after(timeout):
                if "/p2p-circuit" in str(info.addrs[0]):
                    # libp2p's swarm cannot dial circuits (DESIGN.md §3): our relay does (dht/relay.py).
                    from molink.dht.relay import dial_relayed

                    await dial_relayed(host, f"{info.addrs[0]}/p2p/{peer_id}", timeout)
                else:
                    await host.connect(PeerInfo(peer_id, info.addrs))
            return peer_id
        except trio.TooSlowError:
            errors.append(f"{info.addrs[0]}: timed out after {timeout} s")
        except Exception as exc:  # libp2p raises SwarmException and friends, untyped per cause
            reason = dial_failure_reason(exc)  # a private swarm's refusal says why
            errors.append(f"{info.addrs[0]}: {reason or f'{type(exc).__name__}: {exc}'}")
    # Leave no block behind: the caller may learn a fresh address any moment.
    host.get_network().unblock_peer(peer_id)
    raise ConnectError(f"could not connect to {peer_id}: " + "; ".join(errors))
