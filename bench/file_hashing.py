"""Source-side cost of a BitTorrent entry: making the torrent of a file, dense and sparse.

A source hashes every file it sends by BitTorrent before seeding it. The agent reads the file through the
descriptor it opened as the task's user and hashes the pieces in Python (`make_torrent_fd`), skipping the
pieces that lie wholly in holes (their hash is that of zeros, computed once); libtorrent's own
`set_piece_hashes` (what the agent used before) reads the file by path and hashes the holes too. This prints,
for a dense file and for a sparse one (a VM-image-like file: a little data, a big hole), the time and rate of
both, best of --runs, and the machine's load before and after.

    python bench/file_hashing.py --dense-mb 1024 --sparse-gb 8 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from gse.agent import sparse  # noqa: E402
from gse.agent.torrent import make_torrent, make_torrent_fd  # noqa: E402


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def write_dense(path: str, size: int) -> None:
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            left -= f.write(block[:min(left, len(block))])


def write_sparse(path: str, size: int, data: int) -> None:
    """`data` bytes at the start and at the end, a hole between."""
    with open(path, "wb") as f:
        f.write(os.urandom(data // 2))
        f.seek(size - data // 2)
        f.write(os.urandom(data // 2))


async def best(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return min(times)


async def measure(path: str, runs: int) -> tuple[float, float, bytes, bytes]:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        holes = sparse.holes(fd, size)
        out = {}

        async def by_path():
            out["path"] = await make_torrent(path)

        async def by_fd():
            out["fd"] = await make_torrent_fd(fd, os.path.basename(path), size,
                                              lambda plen, n: sparse.hole_pieces(holes, plen, n, size))

        t_path = await best(by_path, runs)
        t_fd = await best(by_fd, runs)
        return t_path, t_fd, out["path"], out["fd"]
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense-mb", type=int, default=1024)
    ap.add_argument("--sparse-gb", type=int, default=8)
    ap.add_argument("--sparse-data-mb", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="", help="where to make the files (default: a temporary dir in /var/tmp)")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="gse-hash-", dir=args.dir or "/var/tmp")
    print(f"load before: {load()}; cpus {os.cpu_count()}; dir {d}")
    try:
        dense = os.path.join(d, "dense.bin")
        write_dense(dense, args.dense_mb << 20)
        sp = os.path.join(d, "disk.img")
        write_sparse(sp, args.sparse_gb << 30, args.sparse_data_mb << 20)
        for label, path in (("dense", dense), ("sparse", sp)):
            size = os.path.getsize(path)
            alloc = os.stat(path).st_blocks * 512
            t_path, t_fd, tor_path, tor_fd = asyncio.run(measure(path, args.runs))
            from gse.agent.torrent import _torrent_info
            same = [_torrent_info(tor_path).hash_for_piece(i) == _torrent_info(tor_fd).hash_for_piece(i)
                    for i in range(_torrent_info(tor_fd).num_pieces())]
            mb = size / (1 << 20)
            print(f"{label:6} {size / (1 << 30):6.2f} GiB ({alloc / (1 << 20):.0f} MiB allocated): "
                  f"libtorrent by path {t_path:7.2f} s ({mb / t_path:7.0f} MB/s); "
                  f"by descriptor, holes skipped {t_fd:7.2f} s ({mb / t_fd:7.0f} MB/s); "
                  f"piece hashes equal: {all(same)}")
    finally:
        for n in os.listdir(d):
            os.unlink(os.path.join(d, n))
        os.rmdir(d)
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
