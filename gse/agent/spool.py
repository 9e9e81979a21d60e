"""The agent's on-disk data spool: every sealed batch is appended here before it is sent, and removed only
once a data server acknowledged it.

A spool is a directory of segment files named by the id of their first batch (`00000000000000000042.seg`).
A segment is a run of entries `u32 length, u32 crc32, u32 records, payload`, where the payload is the
serialized DataBatch exactly as it goes on the wire: one serialization serves the spool and the stream.
Batch ids are consecutive within and across segments and keep growing across restarts.

What this gives (at-least-once):
- a batch is durable (page cache: survives the agent being killed, not the machine losing power unless
  `fsync_interval_s` is set) from the moment `append` returns, which is before it is sent;
- after a restart every batch still in a segment is sent again: the ones whose ack was lost are resent
  (duplicates, never losses); a segment is deleted once every batch in it was acknowledged;
- the spool is bounded: when an append would pass `max_bytes`, the oldest segments are dropped and their
  unacknowledged batches and records counted in `dropped_batches` / `dropped_records`;
- a torn entry at the end of the last segment (the agent died mid-write) is cut off at recovery.

The newest batches are also kept in memory (up to `cache_bytes`) so that a sender that keeps up never
reads the disk.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from array import array
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger("gse.agent.spool")

ENTRY = struct.Struct(">III")       # length of payload, crc32 of payload, records in the batch
SUFFIX = ".seg"


class _Segment:
    __slots__ = ("first_id", "path", "offsets", "sizes", "counts", "acked", "bytes", "fd", "sealed")

    def __init__(self, first_id: int, path: Path):
        self.first_id = first_id
        self.path = path
        self.offsets = array("Q")      # entry i holds batch first_id + i
        self.sizes = array("I")
        self.counts = array("I")
        self.acked: set[int] = set()
        self.bytes = 0
        self.fd: int | None = None
        self.sealed = False

    @property
    def end_id(self) -> int:
        """The id after the segment's last batch."""
        return self.first_id + len(self.offsets)

    def done(self) -> bool:
        """Sealed and every batch in it acknowledged: the file can go."""
        return self.sealed and len(self.acked) == len(self.offsets)


class Spool:
    """The data spool of one agent in `directory` (see the module docstring). Sizes in bytes: `max_bytes` bounds the
    segment files together, `segment_bytes` one segment file, `cache_bytes` the newest batches kept in memory. Raises
    ValueError when `max_bytes` < `segment_bytes` or either is not positive. Not thread-safe: the event loop's thread
    only, apart from `sync`."""
    def __init__(self, directory: str | os.PathLike, *, max_bytes: int, segment_bytes: int, cache_bytes: int):
        if segment_bytes <= 0 or max_bytes < segment_bytes:
            raise ValueError("spool: max_bytes must be at least segment_bytes, both positive")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.cache_bytes = cache_bytes
        self.segments: list[_Segment] = []
        self.next_id = 1
        self.total_bytes = 0
        self.unacked = 0
        self.dropped_batches = 0
        self.dropped_records = 0
        self.write_errors = 0
        self.recovered_batches = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = 0
        self._dirty = False
        self._orphans: dict[int, int] = {}    # batch id -> records: kept in memory only (a write failed)

    # ---- recovery ---------------------------------------------------------------------------------

    def open(self) -> int:
        """Load what a previous run left (every batch in it counts as unacknowledged); returns that count."""
        self.dir.mkdir(parents=True, exist_ok=True)
        names = sorted(p for p in self.dir.iterdir() if p.suffix == SUFFIX and p.stem.isdigit())
        for i, path in enumerate(names):
            seg = _Segment(int(path.stem), path)
            self._scan(seg, last=i == len(names) - 1)
            if not seg.offsets:
                path.unlink(missing_ok=True)
                continue
            seg.sealed = True
            self.segments.append(seg)
            self.total_bytes += seg.bytes
            self.unacked += len(seg.offsets)
            self.next_id = max(self.next_id, seg.end_id)
        self.recovered_batches = self.unacked
        if self.unacked:
            log.info("spool recovered", extra={"batches": self.unacked, "bytes": self.total_bytes,
                                               "segments": len(self.segments)})
        return self.unacked

    def _scan(self, seg: _Segment, last: bool) -> None:
        with open(seg.path, "rb") as f:
            data = f.read()
        off, n = 0, len(data)
        while n - off >= ENTRY.size:
            size, crc, count = ENTRY.unpack_from(data, off)
            end = off + ENTRY.size + size
            if end > n or zlib.crc32(data[off + ENTRY.size:end]) != crc:
                break
            seg.offsets.append(off)
            seg.sizes.append(size)
            seg.counts.append(count)
            off = end
        if off != n:
            log.warning("spool segment has a torn or corrupt tail; cut off",
                        extra={"segment": seg.path.name, "kept": off, "size": n, "last": last})
            with open(seg.path, "r+b") as f:
                f.truncate(off)
        seg.bytes = off

    # ---- writing ----------------------------------------------------------------------------------

    def append(self, payload_for, records: int) -> tuple[int, bytes]:
        """Give the next batch id to `payload_for(batch_id) -> bytes`, store the result; returns both."""
        batch_id = self.next_id
        self.next_id += 1
        payload = payload_for(batch_id)
        need = ENTRY.size + len(payload)
        self._make_room(need)
        seg = self.segments[-1] if self.segments and not self.segments[-1].sealed else None
        if seg is None or (seg.bytes and seg.bytes + need > self.segment_bytes):
            if seg is not None:
                self._seal(seg)
            seg = self._new_segment(batch_id)
        if seg.end_id != batch_id:
            # Ids skipped by a failed write: start a new segment so that ids stay consecutive inside one.
            self._seal(seg)
            seg = self._new_segment(batch_id)
        entry = ENTRY.pack(len(payload), zlib.crc32(payload), records) + payload
        try:
            os.write(seg.fd, entry)
        except OSError as exc:
            self.write_errors += 1
            log.error("spool write failed; batch kept in memory only", extra={"error": str(exc)})
            self._cache_put(batch_id, payload)
            self._orphans[batch_id] = records
            return batch_id, payload
        seg.offsets.append(seg.bytes)
        seg.sizes.append(len(payload))
        seg.counts.append(records)
        seg.bytes += len(entry)
        self.total_bytes += len(entry)
        self.unacked += 1
        self._dirty = True
        self._cache_put(batch_id, payload)
        return batch_id, payload

    def _new_segment(self, first_id: int) -> _Segment:
        seg = _Segment(first_id, self.dir / f"{first_id:020d}{SUFFIX}")
        seg.fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.segments.append(seg)
        return seg

    def _seal(self, seg: _Segment) -> None:
        seg.sealed = True
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None
        if seg.done():
            self._remove(seg)

    def _make_room(self, need: int) -> None:
        while self.segments and self.total_bytes + need > self.max_bytes:
            seg = self.segments[0]
            if not seg.sealed:
                self._seal(seg)
                if seg not in self.segments:
                    continue
            lost = [i for i in range(len(seg.offsets)) if seg.first_id + i not in seg.acked]
            self.dropped_batches += len(lost)
            self.dropped_records += sum(seg.counts[i] for i in lost)
            log.warning("spool full: dropped the oldest segment",
                        extra={"segment": seg.path.name, "batches": len(lost),
                               "records": sum(seg.counts[i] for i in lost)})
            self.unacked -= len(lost)
            for i in lost:
                self._cache_drop(seg.first_id + i)
            self._remove(seg)

    def _remove(self, seg: _Segment) -> None:
        if seg.fd is not None:
            os.close(seg.fd)
            seg.fd = None
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass
        self.total_bytes -= seg.bytes
        self.segments.remove(seg)

    # ---- acknowledgement and reading ----------------------------------------------------------------

    def _find(self, batch_id: int) -> _Segment | None:
        segs = self.segments
        lo, hi = 0, len(segs)
        while lo < hi:
            mid = (lo + hi) // 2
            if segs[mid].end_id <= batch_id:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(segs) and segs[lo].first_id <= batch_id < segs[lo].end_id:
            return segs[lo]
        return None

    def ack(self, batch_id: int) -> bool:
        """Mark a batch acknowledged; True when it was pending (not acked before, not dropped)."""
        self._cache_drop(batch_id)
        if self._orphans.pop(batch_id, None) is not None:
            return True
        seg = self._find(batch_id)
        if seg is None or batch_id in seg.acked:
            return False
        seg.acked.add(batch_id)
        self.unacked -= 1
        if seg.done():
            self._remove(seg)
        return True

    def pending(self, batch_id: int) -> bool:
        """The batch is neither acknowledged nor dropped (it is to be sent, or sent again)."""
        if batch_id in self._orphans:
            return True
        seg = self._find(batch_id)
        return seg is not None and batch_id not in seg.acked

    def first_pending(self, after: int = 0) -> int | None:
        """The smallest unacknowledged batch id greater than or equal to `after`, or None."""
        cands = [b for b in self._orphans if b >= after]
        best = min(cands) if cands else None
        for seg in self.segments:
            if seg.end_id <= after:
                continue
            start = max(after, seg.first_id)
            for b in range(start, seg.end_id):
                if b not in seg.acked:
                    return b if best is None else min(b, best)
        return best

    def read(self, batch_id: int) -> bytes | None:
        """The serialized batch, from memory when it is still cached, else from its segment."""
        payload = self._cache.get(batch_id)
        if payload is not None:
            return payload
        seg = self._find(batch_id)
        if seg is None:
            return None
        i = batch_id - seg.first_id
        with open(seg.path, "rb") as f:
            f.seek(seg.offsets[i] + ENTRY.size)
            return f.read(seg.sizes[i])

    def records_of(self, batch_id: int) -> int:
        """How many records the batch holds (0 once its segment is gone, or for an id never made)."""
        seg = self._find(batch_id)
        return seg.counts[batch_id - seg.first_id] if seg is not None else self._orphans.get(batch_id, 0)

    def _cache_put(self, batch_id: int, payload: bytes) -> None:
        if self.cache_bytes <= 0:
            return
        self._cache[batch_id] = payload
        self._cache_size += len(payload)
        while self._cache_size > self.cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_size -= len(old)

    def _cache_drop(self, batch_id: int) -> None:
        payload = self._cache.pop(batch_id, None)
        if payload is not None:
            self._cache_size -= len(payload)

    # ---- housekeeping -----------------------------------------------------------------------------

    def sync(self) -> None:
        """fsync the segment being written (called from a thread by the agent when configured)."""
        if not self._dirty:
            return
        self._dirty = False
        for seg in self.segments:
            if seg.fd is not None:
                try:
                    os.fsync(seg.fd)
                except OSError:
                    pass

    def close(self) -> None:
        """Close the segment files (the spool is reopened with `open` by the next run)."""
        for seg in self.segments:
            if seg.fd is not None:
                os.close(seg.fd)
                seg.fd = None
            seg.sealed = True

    def stats(self) -> dict:
        """Counters for metrics and health: unacknowledged batches, bytes and segments on disk, batches and records
        dropped for room, failed writes, and the batches recovered at start."""
        return {"unacked_batches": self.unacked, "bytes": self.total_bytes, "segments": len(self.segments),
                "dropped_batches": self.dropped_batches, "dropped_records": self.dropped_records,
                "write_errors": self.write_errors, "recovered_batches": self.recovered_batches}
