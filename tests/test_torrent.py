"""The agent's libtorrent session: real transfers between sessions on 127.0.0.x, with the file server's tracker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import pytest

from gse.agent.torrent import Progress, TorrentError, TorrentSession, info_hash, make_torrent
from gse.fileserver.tracker import Tracker

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20


@pytest.fixture
async def tracker():
    t = Tracker(interval=30, min_interval=5)
    await t.start("127.0.0.1", 0)
    try:
        yield t
    finally:
        await t.stop()


@contextlib.asynccontextmanager
async def sessions(*ips: str, **kwargs):
    started: list[TorrentSession] = []
    try:
        for ip in ips:
            s = TorrentSession(f"{ip}:0", **kwargs)
            await s.start()
            started.append(s)
        yield started
    finally:
        await asyncio.gather(*(s.close() for s in started))


def write_random(path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_torrent_swarm_through_tracker(tmp_path, tracker):
    src_dir, size = tmp_path / "src", 20 * MB
    src_dir.mkdir()
    data = write_random(src_dir / "payload.bin", size)
    torrent = await make_torrent(str(src_dir / "payload.bin"))
    ih = info_hash(torrent)
    assert len(ih) == 20

    members = {"seed", "d1", "d2", "d3"}
    tracker.register_transfer("task:0", ih, 0, members)
    other = tracker.register_transfer("task-other:0", b"\x01" * 20, 0, {"outsider"})

    async with sessions("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14", "127.0.0.15") as all_sessions:
        seed_s, *down_s, outsider_s = all_sessions
        seed = await seed_s.seed(torrent, str(src_dir / "payload.bin"), tracker.announce_url("task:0", "seed"))
        assert seed.complete

        early_final: list[str] = []
        reports: dict[str, list[Progress]] = {}
        downloads, dest_dirs = [], []
        for i, s in enumerate(down_s, 1):
            dest = tmp_path / f"dst{i}"
            dest.mkdir()
            dest_dirs.append(dest)
            final = dest / "payload.bin"
            reports[f"d{i}"] = []

            def on_progress(p: Progress, final=final, log=reports[f"d{i}"]):
                log.append(p)
                if final.exists():
                    early_final.append(str(final))

            downloads.append(await s.download(torrent, str(dest), tracker.announce_url("task:0", f"d{i}"),
                                              on_progress=on_progress))
        # Someone outside the transfer, with a valid token of another transfer, learns no peers.
        outsider_dir = tmp_path / "outsider"
        outsider_dir.mkdir()
        outsider = await outsider_s.download(torrent, str(outsider_dir),
                                             f"{tracker.public_url}?gse_token={other['outsider']}")

        await asyncio.wait_for(asyncio.gather(*(d.wait_complete() for d in downloads)), 40)
        for d, dest in zip(downloads, dest_dirs):
            assert d.file_name == f".gse-{ih.hex()}.part"
            assert (dest / d.file_name).exists() and not (dest / "payload.bin").exists()
            assert d.progress().progress == 100.0 and d.progress().total_size == size
        assert not early_final

        paths = await asyncio.gather(*(s.commit(d, "payload.bin") for s, d in zip(down_s, downloads)))
        for path, dest in zip(paths, dest_dirs):
            assert path == str(dest / "payload.bin")
            with open(path, "rb") as f:
                assert f.read() == data
            assert os.listdir(dest) == ["payload.bin"]  # the .part file is gone (renamed, not copied)

        for name, log in reports.items():
            assert log, f"{name} reported no progress"
            assert all(0 <= p.progress <= 100 for p in log)
            assert all(p.total_size == size for p in log)
            # (num_peers is sampled every 0.5 s: a loopback swarm can finish between two samples, so the
            # peers are checked at the tracker below, not here.)

        await wait_until(lambda: outsider.tracker_error is not None, 10, "the outsider's tracker refusal")
        assert "unauthorized" in outsider.tracker_error
        assert outsider.progress().num_peers == 0 and outsider.progress().total_done == 0
        stats = tracker.transfer_stats("task:0")
        assert set(stats.peers) == members          # every member announced and got the others
        assert {p.ip for p in stats.peers.values()} <= {"127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"}
        assert "outsider" not in stats.peers and not tracker.transfer_stats("task-other:0").peers


async def test_torrent_corrupt_piece_is_refetched(tmp_path):
    size = 4 * MB
    good_dir, bad_dir, dest = tmp_path / "good", tmp_path / "bad", tmp_path / "dest"
    for d in (good_dir, bad_dir, dest):
        d.mkdir()
    data = write_random(good_dir / "f.bin", size)
    torrent = await make_torrent(str(good_dir / "f.bin"), piece_size=64 * 1024)
    corrupted = bytearray(data)
    for offset in range(0, size, 64 * 1024):
        corrupted[offset + 100] ^= 0xFF  # one flipped byte in every piece
    (bad_dir / "f.bin").write_bytes(bytes(corrupted))

    async with sessions("127.0.0.21", "127.0.0.22", "127.0.0.23") as (bad_s, good_s, down_s):
        # verified=True: the bad seed trusts its file and serves the flipped bytes (seed mode would check them).
        bad = await bad_s.seed(torrent, str(bad_dir / "f.bin"), verified=True)
        await good_s.seed(torrent, str(good_dir / "f.bin"))
        down = await down_s.download(torrent, str(dest))

        down_s.add_peer(down, *bad_s.listen_address)
        await wait_until(lambda: down.hash_failures > 0, 15, "a hash failure from the bad seed")
        assert not down.complete and bad.error is None
        down_s.add_peer(down, *good_s.listen_address)

        await down.wait_complete(timeout=30)
        final = await down_s.commit(down, "f.bin")
        with open(final, "rb") as f:
            assert f.read() == data
        assert down.progress().hash_failures == down.hash_failures > 0


async def test_torrent_seed_mode_detects_changed_source(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    data = write_random(src / "f.bin", 1 * MB)
    torrent = await make_torrent(str(src / "f.bin"), piece_size=64 * 1024)
    (src / "f.bin").write_bytes(bytes(b ^ 0x55 for b in data[:10]) + data[10:])  # changed after hashing

    async with sessions("127.0.0.31", "127.0.0.32") as (seed_s, down_s):
        seed = await seed_s.seed(torrent, str(src / "f.bin"))
        down = await down_s.download(torrent, str(dest))
        down_s.add_peer(down, *seed_s.listen_address)
        await wait_until(lambda: seed.error is not None, 15, "the seed noticing its changed file")
        assert "does not match" in seed.error
        assert not down.complete


async def test_torrent_rate_limit_and_remove_deletes_part_file(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    write_random(src / "f.bin", 4 * MB)
    torrent = await make_torrent(str(src / "f.bin"))

    async with sessions("127.0.0.41", "127.0.0.42") as (seed_s, down_s):
        await seed_s.seed(torrent, str(src / "f.bin"))
        down = await down_s.download(torrent, str(dest), download_rate_limit=512 * 1024, tmp_name="f.tmp")
        down_s.add_peer(down, *seed_s.listen_address)
        await wait_until(lambda: down.progress().total_done > 0, 15, "the first piece")
        before, started = down.progress().total_done, time.monotonic()
        await asyncio.sleep(2.0)
        gained = down.progress().total_done - before
        rate = gained / (time.monotonic() - started)
        assert 0 < rate < 1 * MB, rate  # about 512 KB/s; unlimited on loopback it is hundreds of MB/s
        assert not down.complete and (dest / "f.tmp").exists()

        with pytest.raises(TorrentError):
            await down_s.commit(down, "f.bin")  # not complete yet

        await down_s.remove(down, delete_files=True)
        assert not (dest / "f.tmp").exists() and not (dest / "f.bin").exists()
        with pytest.raises(TorrentError):
            await down.wait_complete(timeout=1)


async def test_torrent_striped_downloads_share_and_complete(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    data = write_random(src / "f.bin", 6 * MB)
    torrent = await make_torrent(str(src / "f.bin"), piece_size=256 * 1024)

    async with sessions("127.0.0.51", "127.0.0.52", "127.0.0.53", "127.0.0.54") as (seed_s, a_s, b_s, c_s):
        await seed_s.seed(torrent, str(src / "f.bin"))
        downs = []
        for name, s, k in (("a", a_s, 0), ("b", b_s, 1)):
            d = tmp_path / name
            d.mkdir()
            downs.append((s, d, await s.download(torrent, str(d), stripe=(k, 2))))
        a = downs[0][2]
        assert a.handle.get_piece_priorities()[:4] == [7, 0, 7, 0]   # the other share waits for a holder
        for s, _d, t in downs:
            s.add_peer(t, *seed_s.listen_address)
        a_s.add_peer(a, *b_s.listen_address)
        for s, _d, t in downs:
            await t.wait_complete(timeout=30)
            assert open(await s.commit(t, "f.bin"), "rb").read() == data

        # A stripe whose other targets never show up: once its own share is in, it takes the rest from the source.
        d = tmp_path / "c"
        d.mkdir()
        c = await c_s.download(torrent, str(d), stripe=(2, 3))
        c_s.add_peer(c, *seed_s.listen_address)
        await c.wait_complete(timeout=30)
        assert open(await c_s.commit(c, "f.bin"), "rb").read() == data


async def test_torrent_rejects_bad_input(tmp_path):
    with pytest.raises(TorrentError):
        await make_torrent(str(tmp_path / "missing"))
    with pytest.raises(TorrentError):
        info_hash(b"not a torrent")
    (tmp_path / "f").write_bytes(b"x" * 1000)
    torrent = await make_torrent(str(tmp_path / "f"))
    async with sessions("127.0.0.51") as (s,):
        with pytest.raises(TorrentError):
            await s.download(torrent, str(tmp_path / "nodir"))
        with pytest.raises(TorrentError):
            await s.download(torrent, str(tmp_path), tmp_name="../escape")
        (tmp_path / "short").write_bytes(b"x" * 10)
        with pytest.raises(TorrentError):
            await s.seed(torrent, str(tmp_path / "short"))
        await s.seed(torrent, str(tmp_path / "f"))
        with pytest.raises(TorrentError):
            await s.download(torrent, str(tmp_path))  # already in this session
