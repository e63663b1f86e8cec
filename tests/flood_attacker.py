"""The attacker of tests/test_abuse.py, as its own process (so its CPU and GIL are not the
legitimate client's): several identities flooding one peer with session opens.

    python tests/flood_attacker.py ADDRESS MODEL_KEY ATTACKERS OPENS_PER_ATTACKER HIDDEN

Connects every identity, prints "ready", waits for a line on stdin, then fires the opens (up to
IN_FLIGHT_PER_ATTACKER at a time per identity). An accepted session prefills PREFILL tokens and
is abandoned: never stepped again, never closed, until the peer expires it. Prints one JSON line:
the outcome counts and how long the flood took.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

import torch
import trio

from molink.crypto.identity import Identity
from molink.dht.host import connect_peer, running_host
from molink.dht.streams import STREAM_ERRORS, FramedStream, ReceiveTimeout, open_framed_stream, open_raw_stream
from molink.dht.wire import Frame, encode_tensor
from molink.peer import protocol as p

IN_FLIGHT_PER_ATTACKER = 64
MAX_LENGTH = 512
PREFILL = 480


async def request(framed: FramedStream, frame: Frame, counts: Counter) -> Frame | None:
    """Send, then the next frame (a refusal may come before the peer even read the request,
    with request id 0: no id check)."""
    try:
        await framed.send(frame)
        reply = await framed.receive(timeout=60)
    except STREAM_ERRORS as exc:
        counts[f"stream_error:{type(exc).__name__}"] += 1
        return None
    if reply.type == p.ERROR:
        if not reply.body.get("message"):
            counts["error_without_message"] += 1
        counts[f"{reply.body.get('code')}:{reply.body.get('limit')}"] += 1
    return reply


async def one_open(host, peer_id, model_key: str, hidden_size: int, slots: trio.Semaphore, counts: Counter,
                   done: trio.Event) -> None:
    await slots.acquire()
    holding = False
    try:
        try:
            raw = await open_raw_stream(host, peer_id, p.INFERENCE_PROTOCOL, open_timeout=30)
        except STREAM_ERRORS as exc:
            counts[f"stream_refused:{str(exc)[-80:]}"] += 1
            return
        async with open_framed_stream(raw, limits=p.PEER_WIRE_LIMITS) as framed:
            open_body = p.OpenRequest(os.urandom(p.SESSION_ID_BYTES), model_key, 0, 6, 1, MAX_LENGTH, None).to_body()
            reply = await request(framed, Frame(p.OPEN, 1, open_body), counts)
            if reply is None or reply.type != p.OPENED:
                return
            counts["opened"] += 1
            body = {"step": 1, "hidden": encode_tensor(torch.randn(1, PREFILL, hidden_size), codec="raw"),
                    "mask": encode_tensor(torch.ones(1, PREFILL, dtype=torch.int64), codec="raw"), "relay": False}
            reply = await request(framed, Frame(p.STEP, 2, body), counts)
            if reply is None or reply.type != p.RESULT:
                return  # e.g. expired before its prefill came through: counted by request()
            counts["prefilled"] += 1
            slots.release()
            holding = True
            while not done.is_set():  # abandoned: only listen, until the peer gives up on it
                try:
                    frame = await framed.receive(timeout=0.5)
                except ReceiveTimeout:
                    continue
                except STREAM_ERRORS:
                    counts["held_stream_ended"] += 1
                    return
                if frame.type == p.ERROR:
                    counts[f"later:{frame.body.get('code')}"] += 1
                    return
    finally:
        if not holding:
            slots.release()
        counts["attempted"] += 1


async def attacker(address: str, model_key: str, hidden_size: int, opens: int, counts: Counter,
                   connected: trio.Event, go: trio.Event, done: trio.Event) -> None:
    async with running_host(Identity.generate().keypair) as host:
        peer_id = await connect_peer(host, address)
        connected.set()
        await go.wait()
        slots = trio.Semaphore(IN_FLIGHT_PER_ATTACKER)
        async with trio.open_nursery() as nursery:
            for _ in range(opens):
                nursery.start_soon(one_open, host, peer_id, model_key, hidden_size, slots, counts, done)
                await trio.sleep(0)


async def main(address: str, model_key: str, attackers: int, opens: int, hidden_size: int) -> None:
    counts: Counter = Counter()
    go, done = trio.Event(), trio.Event()
    connected = [trio.Event() for _ in range(attackers)]
    async with trio.open_nursery() as nursery:
        for event in connected:
            nursery.start_soon(attacker, address, model_key, hidden_size, opens, counts, event, go, done)
        for event in connected:
            await event.wait()
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        started = time.monotonic()
        go.set()
        while counts["attempted"] < attackers * opens:
            await trio.sleep(0.05)
        done.set()
    print(json.dumps({"counts": dict(counts), "seconds": time.monotonic() - started}), flush=True)


if __name__ == "__main__":
    address, model_key, attackers, opens, hidden = sys.argv[1:6]
    trio.run(main, address, model_key, int(attackers), int(opens), int(hidden))
