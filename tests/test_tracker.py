"""The file server's per-transfer BitTorrent tracker and its bencode codec."""

from __future__ import annotations

import hashlib
import ipaddress
from urllib.parse import quote_from_bytes

import aiohttp
import pytest
import yarl

from gse.fileserver import bencode
from gse.fileserver.tracker import TOKEN_PARAM, Tracker

HASH_A = hashlib.sha1(b"file a").digest()
HASH_B = hashlib.sha1(b"file b").digest()


# ---- bencode ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    0, -42, 2**70, b"", b"spam", b"\x00\xff" * 10, [], [1, b"a", [b"b"]],
    {}, {b"b": 1, b"a": [b"x", {b"k": b"v"}]},
])
def test_bencode_round_trip(value):
    assert bencode.decode(bencode.encode(value)) == value


def test_bencode_encodes_str_and_sorts_keys():
    assert bencode.encode({"z": "é", "a": 1}) == b"d1:ai1e1:z2:\xc3\xa9e"
    assert bencode.encode({"peers": b"", "interval": 30}) == b"d8:intervali30e5:peers0:e"


@pytest.mark.parametrize("bad", [
    b"", b"i12", b"i-0e", b"i03e", b"ie", b"5:abc", b"l", b"d1:ae", b"di1ei2ee", b"i1ei2e", b"x", b"-1:a",
    b"d1:ai1e1:ai2ee",
])
def test_bencode_rejects_malformed(bad):
    with pytest.raises(bencode.BencodeError):
        bencode.decode(bad)


def test_bencode_rejects_unencodable():
    for value in (True, 1.5, None, {1: b"x"}):
        with pytest.raises(bencode.BencodeError):
            bencode.encode(value)


# ---- tracker ---------------------------------------------------------------------------------------------------

@pytest.fixture
async def tracker():
    t = Tracker(interval=30, min_interval=5)
    await t.start("127.0.0.1", 0)
    try:
        yield t
    finally:
        await t.stop()


async def announce(tracker: Tracker, info_hash: bytes, token: str | None, port: int, *, event: str | None = None,
                   left: int = 100, numwant: int | None = None, uploaded: int = 0, downloaded: int = 0,
                   compact: int = 1) -> dict:
    """One announce the way libtorrent sends it: binary fields percent-encoded, the token first."""
    parts = [f"{TOKEN_PARAM}={token}"] if token is not None else []
    parts += [f"info_hash={quote_from_bytes(info_hash, safe='')}",
              f"peer_id={quote_from_bytes(b'-LT2110-' + bytes(12), safe='')}",
              f"port={port}", f"uploaded={uploaded}", f"downloaded={downloaded}", f"left={left}",
              "corrupt=0", "key=9F6FD006", f"compact={compact}", "no_peer_id=1"]
    if event:
        parts.append(f"event={event}")
    if numwant is not None:
        parts.append(f"numwant={numwant}")
    url = yarl.URL(f"{tracker.public_url}?{'&'.join(parts)}", encoded=True)
    async with aiohttp.ClientSession() as http:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200
            return bencode.decode(await resp.read())


def compact_peers(reply: dict) -> set[tuple[str, int]]:
    raw = reply[b"peers"]
    assert len(raw) % 6 == 0
    return {(str(ipaddress.IPv4Address(raw[i:i + 4])), int.from_bytes(raw[i + 4:i + 6], "big"))
            for i in range(0, len(raw), 6)}


async def test_tracker_compact_peers_scoped_by_transfer_and_area(tracker):
    # The same file goes to area 0 and area 1: two transfers sharing an info_hash, never sharing peers.
    t0 = tracker.register_transfer("task1:0", HASH_A, 0, {"a", "b", "c"},
                                   addresses={"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"})
    t1 = tracker.register_transfer("task1:1", HASH_A, 1, {"x", "y"}, addresses={"x": "10.1.0.1"})
    other = tracker.register_transfer("task2:0", HASH_B, 0, {"a", "z"})

    first = await announce(tracker, HASH_A, t0["a"], 6001, event="started", left=0)
    assert first[b"interval"] == 30 and first[b"min interval"] == 5
    assert compact_peers(first) == set()
    await announce(tracker, HASH_A, t0["b"], 6002, event="started")
    await announce(tracker, HASH_A, t1["x"], 6101, event="started")
    await announce(tracker, HASH_B, other["a"], 6201, event="started")
    # No explicit address for y: the peer's address is the request's remote address.
    reply_y = await announce(tracker, HASH_A, t1["y"], 6102, event="started")
    assert compact_peers(reply_y) == {("10.1.0.1", 6101)}

    reply_c = await announce(tracker, HASH_A, t0["c"], 6003, event="started")
    assert compact_peers(reply_c) == {("10.0.0.1", 6001), ("10.0.0.2", 6002)}
    assert reply_c[b"complete"] == 1 and reply_c[b"incomplete"] == 2

    reply_x = await announce(tracker, HASH_A, t1["x"], 6101)
    assert compact_peers(reply_x) == {("127.0.0.1", 6102)}

    # A seed is not sent other seeds, only the peers that still need pieces.
    reply_a = await announce(tracker, HASH_A, t0["a"], 6001, left=0)
    assert compact_peers(reply_a) == {("10.0.0.2", 6002), ("10.0.0.3", 6003)}

    plain = await announce(tracker, HASH_A, t0["b"], 6002, compact=0)
    assert {(p[b"ip"], p[b"port"]) for p in plain[b"peers"]} == {(b"10.0.0.1", 6001), (b"10.0.0.3", 6003)}


async def test_tracker_never_introduces_members_of_different_areas_unless_the_transfer_may_cross(tracker):
    """One transfer whose members are of two areas (a source and a relay proxy in area 0, hosts of area 1):
    each member learns only the members of its own area; a transfer allowed to cross areas introduces all."""
    members = {"src", "relay", "h1", "h2"}
    addresses = {"src": "10.0.0.1", "relay": "10.0.0.9", "h1": "10.1.0.1", "h2": "10.1.0.2"}
    areas = {"h1": 1, "h2": 1}
    t = tracker.register_transfer("t/a", HASH_A, 0, members, addresses=addresses, areas=areas)
    for m, port in (("src", 6001), ("relay", 6009), ("h1", 6101), ("h2", 6102)):
        await announce(tracker, HASH_A, t[m], port, event="started", left=0 if m == "src" else 100)
    assert compact_peers(await announce(tracker, HASH_A, t["h1"], 6101)) == {("10.1.0.2", 6102)}
    assert compact_peers(await announce(tracker, HASH_A, t["relay"], 6009)) == {("10.0.0.1", 6001)}
    assert compact_peers(await announce(tracker, HASH_A, t["src"], 6001, left=0)) == {("10.0.0.9", 6009)}

    crossing = tracker.register_transfer("t/b", HASH_B, 0, members, addresses=addresses, areas=areas,
                                         cross_area=True)
    for m, port in (("src", 7001), ("h1", 7101), ("h2", 7102)):
        await announce(tracker, HASH_B, crossing[m], port, event="started", left=0 if m == "src" else 100)
    assert compact_peers(await announce(tracker, HASH_B, crossing["h1"], 7101)) == \
        {("10.0.0.1", 7001), ("10.1.0.2", 7102)}


async def test_tracker_refuses_unknown_info_hash(tracker):
    tokens = tracker.register_transfer("t", HASH_A, 0, {"a"})
    reply = await announce(tracker, HASH_B, tokens["a"], 6001, event="started")
    assert b"unknown info_hash" in reply[b"failure reason"]
    assert b"peers" not in reply
    tracker.unregister_transfer("t")
    reply = await announce(tracker, HASH_A, tokens["a"], 6001)
    assert b"unknown info_hash" in reply[b"failure reason"]


async def test_tracker_refuses_missing_unknown_and_foreign_tokens(tracker):
    mine = tracker.register_transfer("t1", HASH_A, 0, {"a", "b"})
    theirs = tracker.register_transfer("t2", HASH_B, 0, {"z"})
    await announce(tracker, HASH_A, mine["a"], 6001, event="started")

    for token in (None, "", "not-a-token", theirs["z"]):
        reply = await announce(tracker, HASH_A, token, 7000, event="started")
        assert reply[b"failure reason"].startswith(b"unauthorized"), token
        assert b"peers" not in reply
    # Nobody refused got into the swarm.
    assert set(tracker.transfer_stats("t1").peers) == {"a"}

    tracker.remove_member("t1", "b")
    reply = await announce(tracker, HASH_A, mine["b"], 6002, event="started")
    assert reply[b"failure reason"].startswith(b"unauthorized")
    assert tracker.refusals["unauthorized"] == 5


async def test_tracker_stopped_event_removes_peer(tracker):
    tokens = tracker.register_transfer("t", HASH_A, 0, {"a", "b"})
    await announce(tracker, HASH_A, tokens["a"], 6001, event="started")
    assert compact_peers(await announce(tracker, HASH_A, tokens["b"], 6002, event="started")) == {("127.0.0.1", 6001)}
    await announce(tracker, HASH_A, tokens["a"], 6001, event="stopped")
    assert compact_peers(await announce(tracker, HASH_A, tokens["b"], 6002)) == set()
    assert set(tracker.transfer_stats("t").peers) == {"b"}


async def test_tracker_honours_numwant_and_cap(tracker):
    members = {f"m{i}" for i in range(10)}
    tokens = tracker.register_transfer("t", HASH_A, 0, members, max_peers_returned=4)
    for i, m in enumerate(sorted(members)):
        await announce(tracker, HASH_A, tokens[m], 6000 + i, event="started")
    assert len(compact_peers(await announce(tracker, HASH_A, tokens["m0"], 6000, numwant=2))) == 2
    assert len(compact_peers(await announce(tracker, HASH_A, tokens["m0"], 6000, numwant=200))) == 4
    assert len(compact_peers(await announce(tracker, HASH_A, tokens["m0"], 6000, numwant=0))) == 0


async def test_tracker_transfer_stats(tracker):
    tokens = tracker.register_transfer("t", HASH_A, 3, {"src", "dst"})
    await announce(tracker, HASH_A, tokens["src"], 6001, event="started", left=0, uploaded=0)
    await announce(tracker, HASH_A, tokens["dst"], 6002, event="started", left=1000)
    await announce(tracker, HASH_A, tokens["src"], 6001, left=0, uploaded=1000)
    await announce(tracker, HASH_A, tokens["dst"], 6002, event="completed", left=0, downloaded=1000)
    stats = tracker.transfer_stats("t")
    assert stats.area == 3 and stats.seeders == 2 and stats.leechers == 0 and stats.completed == 1
    assert stats.uploaded == 1000 and stats.downloaded == 1000 and stats.left == 0
    assert stats.peers["dst"].completed and stats.peers["dst"].port == 6002


async def test_tracker_mounts_into_existing_app_and_validates_registration():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    t = Tracker()
    app = web.Application()
    t.add_routes(app)
    tokens = t.register_transfer("t", HASH_A, 0, {"a"})
    async with TestClient(TestServer(app)) as client:
        t.public_url = str(client.make_url("/announce"))
        reply = await announce(t, HASH_A, tokens["a"], 6001, event="started")
        assert reply[b"peers"] == b""
    assert t.announce_url("t", "a") == f"{t.public_url}?{TOKEN_PARAM}={tokens['a']}"
    with pytest.raises(ValueError):
        t.register_transfer("t", HASH_A, 0, set())
    with pytest.raises(ValueError):
        t.register_transfer("u", b"short", 0, set())
    with pytest.raises(KeyError):
        t.token("t", "nobody")
