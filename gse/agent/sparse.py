"""Sparse files (VM images, database files): finding their holes and writing so that the holes stay holes.

A source asks the kernel where its file's holes are (`SEEK_HOLE`/`SEEK_DATA`; a filesystem without them reports
none) and sends that map with the entry. Direct mode sends holes as "this many zeros here" without data, and a
target never writes a block of zeros (it leaves a hole and sets the size at the end). BitTorrent targets take
the pieces that lie wholly inside a hole as already had (they are zeros on a new sparse file), so they are never
downloaded or written; a piece only partly in a hole is written whole. The target's allocated size therefore
stays within a piece or so per hole boundary of the source's.
"""

from __future__ import annotations

import errno
import os

BLOCK = 64 * 1024                  # writes skip all-zero blocks of this size
MAX_HOLES = 4096                   # holes named per entry (the largest ones; the rest travel as zeros)
_ZERO = bytes(BLOCK)


def holes(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges below `size` that read as zeros without being stored, in order; at most
    MAX_HOLES (the largest), none where the filesystem does not tell."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.EINVAL):
                break
            raise
        if start >= size:
            break
        try:
            end = os.lseek(fd, start, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            end = size                      # a hole up to the end of the file
        end = min(end, size)
        if end > start:
            out.append((start, end - start))
        pos = end
    if len(out) > MAX_HOLES:
        out = sorted(sorted(out, key=lambda h: -h[1])[:MAX_HOLES])
    return out


def flatten(hs: list[tuple[int, int]]) -> list[int]:
    """[(offset, length), ...] -> [offset, length, offset, length, ...] (the wire form)."""
    return [x for h in hs for x in h]


def pairs(flat) -> list[tuple[int, int]]:
    """The wire form back to sorted (offset, length) pairs; malformed input gives no holes."""
    flat = list(flat)
    if len(flat) % 2 or any(x < 0 for x in flat):
        return []
    return sorted(zip(flat[0::2], flat[1::2]))


def hole_pieces(hs: list[tuple[int, int]], piece_length: int, num_pieces: int, total: int) -> list[bool]:
    """Per piece: whether it lies wholly inside one hole (reads as zeros without being written)."""
    out = [False] * num_pieces
    for offset, length in hs:
        end = offset + length
        first = -(-offset // piece_length)             # the first piece starting at or after the hole's start
        for i in range(first, num_pieces):
            p_start = i * piece_length
            p_end = min(total, p_start + piece_length)
            if p_end > end:
                break
            out[i] = True
    return out


def pwrite_sparse(fd: int, data: bytes, offset: int) -> None:
    """Write `data` at `offset`, leaving out the blocks that are all zeros (the file must be new: what is left
    out reads as zeros only where nothing was written before). Set the size with ftruncate at the end."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        block = view[pos:pos + BLOCK]
        if block != _ZERO[:len(block)]:
            # extend the run of non-zero blocks, then write it in one call
            end = pos + len(block)
            while end < len(view):
                nxt = view[end:end + BLOCK]
                if nxt == _ZERO[:len(nxt)]:
                    break
                end += len(nxt)
            chunk = view[pos:end]
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], offset + pos + done)
            pos = end
        else:
            pos += len(block)


def copy_sparse(src_fd: int, dst_fd: int, size: int, chunk: int = 1 << 20) -> None:
    """Copy `size` bytes from `src_fd` to the new file `dst_fd`, keeping the source's holes (only its data
    ranges are read, and all-zero blocks inside them are not written either)."""
    data_start = 0
    for h_off, h_len in holes(src_fd, size) + [(size, 0)]:
        pos = data_start
        while pos < h_off:
            data = os.pread(src_fd, min(chunk, h_off - pos), pos)
            if not data:
                raise OSError(errno.EIO, f"the source ended at {pos} bytes of {size}")
            pwrite_sparse(dst_fd, data, pos)
            pos += len(data)
        data_start = h_off + h_len
    os.ftruncate(dst_fd, size)
