"""Private swarms (`--swarm-key`): the key file, the pre-Noise key check on real hosts, and a real
swarm of peer processes that serves its members exactly and refuses everyone else."""

from __future__ import annotations

import os
import stat

import pytest
import torch
import trio
from libp2p.kad_dht.kad_dht import DHTMode

from molink.crypto.identity import Identity
from molink.crypto.swarm_key import SwarmKey, SwarmKeyError, load_swarm_key, parse_swarm_key, write_swarm_key
from molink.dht.host import ConnectError, connect_peer, p2p_addrs, running_host
from molink.dht.kademlia import SwarmDHT
from molink.dht import private_swarm
from molink.dht.private_swarm import MULTISTREAM_HEADER, OPENING_BYTES
from molink.dht.model_keys import model_dht_key
from molink.dht.records import SpanRecord

MODEL = model_dht_key("tiny", {"num_hidden_layers": 4}, "ef" * 32)
DEADLINE = 30.0


# ---------------------------------------------------------------------------- the key file


def peer_cli(argv: list[str]) -> int:
    from molink.peer.cli import main

    return main(argv)


def test_make_swarm_key_writes_a_0600_libp2p_format_file_and_never_overwrites(tmp_path, capsys):
    path = tmp_path / "swarm.key"
    assert peer_cli(["make-swarm-key", str(path)]) == 0
    made = capsys.readouterr()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and len(bytes.fromhex(lines[2])) == 32
    key = load_swarm_key(path)
    assert key.fingerprint in made.out and key.secret.hex() not in made.out + repr(key)
    assert peer_cli(["make-swarm-key", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_swarm_key(path) == key


@pytest.mark.parametrize("text, reason", [
    ("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 31 + "\n", "64 hex digits"),
    ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32 + "\n", "not hexadecimal"),
    ("/key/swarm/psk/1.0.0/\n/base64/\n" + "ab" * 32 + "\n", "encoding"),
    ("/key/swarm/other/\n/base16/\n" + "ab" * 32 + "\n", "first line"),
    ("ab" * 32 + "\n", "3 lines"),
])
def test_malformed_key_files_are_refused_with_the_reason(text, reason):
    with pytest.raises(SwarmKeyError, match=reason):
        parse_swarm_key(text)


def test_unsafe_or_missing_key_files_are_refused(tmp_path, capsys):
    path = tmp_path / "swarm.key"
    with pytest.raises(SwarmKeyError, match="make-swarm-key"):
        load_swarm_key(path)
    write_swarm_key(SwarmKey.generate(), path)
    os.chmod(path, 0o644)
    with pytest.raises(SwarmKeyError, match="chmod 600"):
        load_swarm_key(path)
    assert peer_cli(["bootstrap", "--swarm-key", str(path)]) == 2  # before any host starts
    assert "chmod 600" in capsys.readouterr().err


# ---------------------------------------------------------------------------- hosts


async def test_only_hosts_with_the_same_key_connect():
    key, other = SwarmKey.generate(), SwarmKey.generate()
    with trio.fail_after(DEADLINE):
        async with running_host(Identity.generate().keypair, swarm_key=key) as member:
            addr = str(p2p_addrs(member)[0])
            async with running_host(Identity.generate().keypair, swarm_key=key) as friend:
                await connect_peer(friend, addr)
            async with running_host(Identity.generate().keypair, swarm_key=other) as stranger:
                with pytest.raises(ConnectError, match="does not hold this swarm's key"):
                    await connect_peer(stranger, addr, timeout=5)
            async with running_host(Identity.generate().keypair) as keyless:
                started = trio.current_time()
                with pytest.raises(ConnectError, match="--swarm-key"):
                    await connect_peer(keyless, addr, timeout=5)
                assert trio.current_time() - started < 2, "a keyless dialer must be refused at once"
        # the other way round: a member does not talk to a public node either
        async with running_host(Identity.generate().keypair) as public:
            async with running_host(Identity.generate().keypair, swarm_key=key) as member:
                with pytest.raises(ConnectError, match="has no swarm key"):
                    await connect_peer(member, str(p2p_addrs(public)[0]), timeout=5)


async def test_raw_tcp_strangers_are_dropped_without_reaching_libp2p(monkeypatch):
    monkeypatch.setattr(private_swarm, "HANDSHAKE_TIMEOUT", 1.0)  # the silent stranger's wait
    key = SwarmKey.generate()
    with trio.fail_after(DEADLINE):
        async with running_host(Identity.generate().keypair, swarm_key=key) as member:
            transport = member.get_network().transport_manager.get_transports()[0]
            ip, port = str(p2p_addrs(member)[0]).split("/")[2], int(str(p2p_addrs(member)[0]).split("/")[4])
            for opening in (MULTISTREAM_HEADER + b"\x07/noise\n", os.urandom(OPENING_BYTES), b""):
                sock = await trio.open_tcp_stream(ip, port)
                await sock.send_all(opening)
                with trio.fail_after(3):  # silence is dropped at the handshake deadline
                    reply = b""
                    while chunk := await sock.receive_some(4096):
                        reply += chunk
                assert len(reply) == OPENING_BYTES  # its own opening (nonce + proof), then the close
                await sock.aclose()
            assert transport.refused == 3
            assert len(member.get_network().get_connections()) == 0


async def test_strangers_can_neither_join_nor_read_the_dht():
    key = SwarmKey.generate()
    with trio.fail_after(DEADLINE):
        async with running_host(Identity.generate().keypair, swarm_key=key) as boot_host, \
                SwarmDHT(boot_host).running():
            boot_addr = str(p2p_addrs(boot_host)[0])
            server_id = Identity.generate()
            async with running_host(server_id.keypair, swarm_key=key) as host, \
                    SwarmDHT(host, server_id).running() as server:
                assert await server.bootstrap([boot_addr]) == 1
                record = SpanRecord.create(server_id, MODEL, 0, 4, [str(a) for a in host.get_addrs()], 5.0, 64, "t")
                await server.announce(record)
                for stranger_key in (None, SwarmKey.generate()):
                    async with running_host(Identity.generate().keypair, swarm_key=stranger_key) as h, \
                            SwarmDHT(h, mode=DHTMode.CLIENT).running() as stranger:
                        assert await stranger.bootstrap([boot_addr], timeout=3) == 0
                        assert await stranger.find_spans(MODEL) == []
                        assert await stranger.find_record(MODEL, server_id.peer_id) is None
                async with running_host(Identity.generate().keypair, swarm_key=key) as h, \
                        SwarmDHT(h, mode=DHTMode.CLIENT).running() as member:
                    assert await member.bootstrap([boot_addr]) == 1
                    assert [r.peer_id for r in await member.find_spans(MODEL)] == [record.peer_id]


# ---------------------------------------------------------------------------- a real private swarm


def test_private_swarm_serves_members_exactly_and_refuses_strangers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from molink.swarm import DistributedModelForCausalLM
    from molink.swarm.local_swarm import LocalSwarm

    key_file, wrong_file = tmp_path / "swarm.key", tmp_path / "wrong.key"
    write_swarm_key(SwarmKey.generate(), key_file)
    write_swarm_key(SwarmKey.generate(), wrong_file)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(7))
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    with LocalSwarm(tiny_llama, [(0, 3), (3, 6)], workdir=tmp_path / "swarm", swarm_key=key_file) as swarm:
        with DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers, swarm_key=key_file) as model:
            # pushes between the peers (and the direct channels) ran over keyed connections too
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
            assert torch.equal(got, expected)
            assert [(hop.start, hop.end) for hop in model.last_route] == [(0, 3), (3, 6)]
        for stranger_key in (None, wrong_file):  # (a peer holding another key: see the DHT test above)
            with pytest.raises(ConnectionError, match="none of the initial peers answered"):
                DistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers, swarm_key=stranger_key)
        # what `molink-swarm status --swarm-key` runs
        from molink.swarm.status import collect_status

        _key, blocks, found = trio.run(collect_status, swarm.initial_peers, tiny_llama, load_swarm_key(key_file))
        assert blocks == 6 and len(found) == 2
