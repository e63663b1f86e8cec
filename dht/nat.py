"""A peer's NAT life: find out whether it is reachable, then either serve as a relay or use relays.

- Every peer helps others find out (dial-back helper, reachability.py) and accepts circuits from
  relays it holds a reservation with (relay.RelayedListener).
- At start (and every RECHECK_INTERVAL) it asks its bootstrap peers to dial it back. Public: it
  announces its own addresses and, unless told not to, serves as a relay with limits. Private (a
  home router): it reserves a slot on `relays_wanted` relays, announces only the relayed
  addresses, renews each reservation before it runs out and replaces a relay whose connection is
  gone (it left): `on_change` then re-announces at once. Unknown (nobody answered): as today, its
  own addresses.
Relay candidates: the bootstrap peers, then any extra relay addresses given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID

from molink.dht.control import ControlError, checked_ip, read_control, write_control
from molink.dht.host import connect_peer
from molink.dht.reachability import PRIVATE, PUBLIC, UNKNOWN, DialbackHelper, Reachability, check_reachability
from molink.dht.relay import (
    RELAY_PROTOCOL,
    RESERVE,
    RESERVED,
    RelayedListener,
    RelayLimits,
    RelayService,
    circuit_addr,
    split_circuit_addr,
)

logger = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # how often reservations are looked at (a vanished relay is noticed this fast)
RECHECK_INTERVAL = 600.0  # reachability is asked again this often
RESERVE_TIMEOUT = 5.0
CANDIDATE_BACKOFF = 15.0  # a relay that refused or failed is not asked again before this
MIN_TTL, MAX_TTL = 5.0, 86400.0
NAT_MODES = ("auto", PUBLIC, PRIVATE)


@dataclass
class NatConfig:
    mode: str = "auto"  # auto: dial-back decides; public / private: forced (hand-forwarded ports, tests)
    relay_service: bool = True  # serve as a relay when public
    relay_limits: RelayLimits = field(default_factory=RelayLimits)
    relays_wanted: int = 2
    relays: list[str] = field(default_factory=list)  # extra relay candidates (multiaddrs with /p2p/)

    def __post_init__(self) -> None:
        if self.mode not in NAT_MODES:
            raise ValueError(f"NAT mode must be one of {NAT_MODES}")


class RelayReservations:
    """Slots on up to `wanted` relays: reserved, renewed, replaced when a relay goes away."""

    def __init__(self, host: Any, listener: RelayedListener, candidates: Callable[[], Sequence[str]],
                 wanted: int = 2, on_change: Callable[[], Awaitable[None]] | None = None):
        self.host = host
        self.listener = listener
        self.candidates = candidates
        self.wanted = wanted
        self.on_change = on_change
        self.active: dict[ID, tuple[str, float, float]] = {}  # relay -> (its address, expires, ttl)
        self.observed_ip: str | None = None
        self._failed: dict[str, float] = {}

    def addrs(self) -> list[str]:
        me = self.host.get_id().to_base58()
        return [circuit_addr(addr, me) for addr, _, _ in self.active.values()]

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            if await self.check() and self.on_change is not None:
                await self.on_change()
            if not started:
                started = True
                task_status.started()
            await trio.sleep(CHECK_INTERVAL)

    async def check(self) -> bool:
        """One round: drop gone relays, renew, fill up. True if the set of relays changed."""
        before = set(self.active)
        now = time.monotonic()
        for relay, (addr, expires, ttl) in list(self.active.items()):
            if not self.host.get_network().get_connections(relay) or expires < now:
                logger.info("relay %s is gone; looking for another", relay)
                del self.active[relay]
            elif expires - now < ttl / 2 and not await self._reserve(addr):
                logger.info("relay %s did not renew our reservation", relay)
                del self.active[relay]
        for addr in self.candidates():
            if len(self.active) >= self.wanted:
                break
            try:
                _, relay, _ = split_circuit_addr(f"{addr}/p2p-circuit")
            except (ValueError, ControlError):
                continue
            if relay in self.active or relay == self.host.get_id() or now - self._failed.get(addr, -1e9) < CANDIDATE_BACKOFF:
                continue
            if not await self._reserve(addr):
                self._failed[addr] = now
        self.listener.relays = set(self.active)
        changed = set(self.active) != before
        if changed:
            logger.info("relayed addresses now: %s", self.addrs() or "none")
        return changed

    async def _reserve(self, addr: str) -> bool:
        try:
            with trio.fail_after(RESERVE_TIMEOUT):
                relay = await connect_peer(self.host, addr, timeout=RESERVE_TIMEOUT)
                stream = await self.host.new_stream(relay, [RELAY_PROTOCOL])
                try:
                    await write_control(stream, RESERVE, {})
                    answer = await read_control(stream, RESERVE_TIMEOUT)
                finally:
                    with trio.move_on_after(1.0):
                        try:
                            await stream.close()
                        except Exception:
                            pass
        except Exception as exc:  # unreachable, no relay protocol, timeouts
            logger.info("reservation on %s failed: %r", addr, exc)
            return False
        ttl = answer.body.get("ttl")
        if answer.type != RESERVED or type(ttl) is not float or not MIN_TTL <= ttl <= MAX_TTL:
            logger.info("relay %s refused a reservation: %r", relay, answer.body.get("reason"))
            return False
        self.observed_ip = checked_ip(answer.body.get("ip")) or self.observed_ip
        if relay not in self.active:
            logger.info("reserved a relay slot on %s for %.0f s", relay, ttl)
        self.active[relay] = (addr.split("/p2p-circuit")[0], time.monotonic() + ttl, ttl)
        return True


class NatService:
    def __init__(self, host: Any, initial_peers: Sequence[str], config: NatConfig | None = None,
                 on_change: Callable[[], Awaitable[None]] | None = None):
        self.host = host
        self.initial_peers = list(initial_peers)
        self.config = config or NatConfig()
        self.on_change = on_change
        self.reachability = Reachability()
        self.relay_service: RelayService | None = None
        self.listener = RelayedListener(host)
        self.reservations = RelayReservations(host, self.listener, self._candidates, self.config.relays_wanted,
                                              on_change=self._changed)

    @property
    def status(self) -> str:
        return self.reachability.status

    def describe(self) -> str:
        text = f"reachability {self.reachability.describe()}"
        if self.status == PRIVATE:
            text += f"; {len(self.reservations.active)} relay(s): {', '.join(self.reservations.addrs()) or 'none yet'}"
        if self.relay_service is not None:
            service = self.relay_service
            text += (f"; relaying for {len(service.reservations)} peer(s), {service.open_circuits} circuit(s), "
                     f"{service.stats['bytes'] >> 20} MiB so far")
        return text

    def announce_addrs(self, own_addrs: Sequence[str]) -> list[str]:
        """What a span record should list: relayed addresses when we cannot be dialled."""
        return self.reservations.addrs() if self.status == PRIVATE else list(own_addrs)

    def _candidates(self) -> list[str]:
        return [a for a in dict.fromkeys(self.initial_peers + list(self.config.relays)) if "/p2p/" in a]

    def _helpers(self) -> list[ID]:
        helpers = []
        for addr in self.initial_peers:
            try:
                helpers.append(ID.from_base58(addr.rsplit("/p2p/", 1)[1]))
            except Exception:
                continue
        return helpers

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        DialbackHelper(self.host).register()
        self.listener.register()
        await self._decide()
        async with trio.open_nursery() as nursery:
            if self.status == PRIVATE:
                await nursery.start(self.reservations.run)
            task_status.started()
            while self.config.mode == "auto":
                await trio.sleep(RECHECK_INTERVAL)
                before = self.status
                await self._decide()
                if self.status != before:
                    if self.status == PRIVATE:
                        await nursery.start(self.reservations.run)
                    await self._changed()
            await trio.sleep_forever()

    async def _decide(self) -> None:
        if self.config.mode == "auto":
            try:
                self.reachability = await check_reachability(self.host, self._helpers())
            except Exception as exc:  # never let the check take the peer down
                logger.warning("reachability check failed: %r", exc)
                self.reachability = Reachability(UNKNOWN)
        else:
            self.reachability = Reachability(self.config.mode)
        logger.info("%s", f"reachability {self.reachability.describe()}")
        if self.status == PUBLIC and self.config.relay_service and self.relay_service is None:
            self.relay_service = RelayService(self.host, self.config.relay_limits)
            self.relay_service.register()
            logger.info("serving as a relay (limits: %s)", self.config.relay_limits)


# ---------------------------------------------------------------------------- command line


def add_nat_arguments(parser: Any) -> None:
    """NAT options for `molink-peer join` and `bootstrap` (kept here so the CLI stays small)."""
    d = RelayLimits()
    parser.add_argument("--nat", choices=NAT_MODES, default=None,
                        help="reachability: auto = ask bootstrap peers to dial us back (join's default); "
                             "public = dialable, e.g. a forwarded port (bootstrap's default); private = "
                             "behind a NAT: reserve relays and announce relayed addresses")
    parser.add_argument("--relay", action="append", default=[], metavar="MADDR",
                        help="extra relay to reserve a slot on when private (repeatable; bootstrap peers "
                             "are tried first)")
    parser.add_argument("--no-relay-service", action="store_true",
                        help="when public, do not relay for NATed peers")
    parser.add_argument("--relay-slots", type=int, default=d.max_reservations, metavar="N",
                        help=f"when relaying: NATed peers served at once (default {d.max_reservations})")
    parser.add_argument("--relay-circuit-mb", type=int, default=d.circuit_bytes >> 20, metavar="MB",
                        help=f"when relaying: bytes per circuit before it is reset (default {d.circuit_bytes >> 20})")
    parser.add_argument("--relay-circuit-minutes", type=float, default=d.circuit_seconds / 60, metavar="M",
                        help=f"when relaying: circuit lifetime (default {d.circuit_seconds / 60:.0f})")


def nat_config_from_args(args: Any, default_mode: str) -> NatConfig:
    if args.relay_slots < 1 or args.relay_circuit_mb < 1 or args.relay_circuit_minutes <= 0:
        raise ValueError("--relay-slots, --relay-circuit-mb and --relay-circuit-minutes must be positive")
    limits = RelayLimits(max_reservations=args.relay_slots, circuit_bytes=args.relay_circuit_mb << 20,
                         circuit_seconds=args.relay_circuit_minutes * 60)
    return NatConfig(mode=args.nat or default_mode, relay_service=not args.no_relay_service,
                     relay_limits=limits, relays=list(args.relay))
