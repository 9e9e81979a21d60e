"""Probe server: the task server's agent-access stream handler alone, with configurable gRPC options.

Measures nothing by itself; `run_probe.py` starts it, drives clients at it and reads its counters. It serves
`/gse.pb.AgentAccess/Connect` like the task server, over mutual TLS (or plaintext with --plain), with one
of two handler structures:

  queue   the production code (gse.taskserver.agent_access.AgentAccess): an async-generator handler, a
          per-session asyncio.Queue and a reader task per session
  rw      one handler coroutine per stream using context.read()/context.write(); sends go through a small
          per-session deque drained by a task that exists only while writes are pending

Heartbeats go through the real BatchWriter into a fake dbproxy client (execute() returns at once), so the
figure is the gRPC + protobuf + handler + coalescing cost without the dbproxy RPC.

A line protocol on --control-port (plain TCP, 127.0.0.1) answers:
  stats            JSON counters (streams started, sessions, heartbeats, reports, RSS, tracemalloc if on)
  trim             glibc malloc_trim(0); RSS before and after (how much of RSS is freed-but-kept heap)
  bcast R [direct] R broadcast rounds of one pre-serialized TaskRequest frame to every session; JSON timings
                   (time to hand the frame to every stream, time until every agent's report came back, server
                   CPU per target); "direct" (rw only) awaits gather(ctx.write) to time the writes themselves

    python bench/probes/stream_server.py --port 50100 --control-port 50101 --certs /tmp/probecerts \
        --handler rw --opt grpc.http2.bdp_probe=0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import grpc  # noqa: E402
import psutil  # noqa: E402

from gse.common import rpc  # noqa: E402
from gse.common.rpc import identity  # noqa: E402
from gse.common.tls import TLSMaterial  # noqa: E402
from gse.pb import agent_pb2 as pb  # noqa: E402
from gse.taskserver.agent_access import AgentAccess  # noqa: E402
from gse.taskserver.batch_writer import BatchWriter  # noqa: E402


class FakeDb:
    """Stands in for DbClient: a flush costs the op building and coalescing, not the RPC."""

    async def execute(self, ops):
        return []


class Counters:
    def __init__(self):
        self.started = 0
        self.reports = 0
        self.round_acks = 0
        self.round_done: asyncio.Event | None = None
        self.round_target = 0


C = Counters()


class ProbeAccess(AgentAccess):
    """The production handler, counting when a stream handler starts."""

    async def connect(self, request_iterator, context):
        C.started += 1
        async for item in super().connect(request_iterator, context):
            yield item


class RWSession:
    """What the rw handler keeps per agent: no queue, no reader task."""

    __slots__ = ("agent_id", "cloud_id", "ip", "boot_id", "peer", "connected_at", "last_seen", "task", "ctx",
                 "pending", "closed")

    def __init__(self, agent_id, cloud_id, ip, boot_id, peer, connected_at, last_seen, task=None, ctx=None):
        self.agent_id, self.cloud_id, self.ip, self.boot_id = agent_id, cloud_id, ip, boot_id
        self.peer, self.connected_at, self.last_seen, self.task, self.ctx = peer, connected_at, last_seen, task, ctx
        self.pending = None          # deque of frames while a drain task runs
        self.closed = False

    def send(self, frame_bytes: bytes) -> None:
        if self.closed:
            return
        if self.pending is not None:
            self.pending.append(frame_bytes)
            return
        self.pending = collections.deque((frame_bytes,))
        asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self.pending:
                await self.ctx.write(self.pending.popleft())
        except Exception:  # noqa: BLE001 - the stream is gone; the read loop ends the session
            self.close()
        finally:
            self.pending = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.task is not None and self.task is not asyncio.current_task():
                self.task.cancel()


class RWAccess(AgentAccess):
    """One coroutine per stream: read hello, write welcome, then read frames until EOF."""

    def __init__(self, *a, on_report=None, **kw):
        super().__init__(*a, on_report=on_report, **kw)
        self.report_cb = on_report

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(self.SERVICE, {
            "Connect": grpc.stream_stream_rpc_method_handler(
                self.connect_rw, request_deserializer=pb.AgentFrame.FromString, response_serializer=identity),
        })

    async def connect_rw(self, request_iterator, context):
        C.started += 1
        try:
            first = await asyncio.wait_for(context.read(), self.hello_timeout_s)
        except asyncio.TimeoutError:
            return
        if first is grpc.aio.EOF or first.WhichOneof("body") != "hello":
            return
        hello = first.hello
        now = time.monotonic()
        s = RWSession(hello.agent_id, hello.cloud_id, hello.ip, hello.boot_id, context.peer(), now, now,
                      task=asyncio.current_task(), ctx=context)
        self.sessions[hello.agent_id] = s
        self.writer.hset("agent:" + hello.agent_id, {"online": 1, "ip": hello.ip}, self.ttl_ms)
        await context.write(pb.ServerFrame(welcome=pb.Welcome(
            node_id=self.node_id, heartbeat_interval_ms=int(self.hb_interval_s * 1000))).SerializeToString())
        try:
            while True:
                frame = await context.read()
                if frame is grpc.aio.EOF:
                    break
                s.last_seen = time.monotonic()
                kind = frame.WhichOneof("body")
                if kind == "heartbeat":
                    self._heartbeat(s, frame.heartbeat)
                elif kind == "report":
                    self.report_cb(s, frame.report)
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            s.closed = True
            if self.sessions.get(s.agent_id) is s:
                del self.sessions[s.agent_id]


def on_report(session, report) -> None:
    C.reports += 1
    if C.round_done is not None:
        C.round_acks += 1
        if C.round_acks >= C.round_target:
            C.round_done.set()


async def broadcast(access: AgentAccess, rounds: int, direct: bool = False) -> dict:
    """`direct` (rw handler only): write with asyncio.gather(ctx.write(...)) and time until every write completed."""
    out = []
    for r in range(rounds):
        frame = pb.ServerFrame(task=pb.TaskRequest(task_id=f"probe-{r}-{time.time_ns()}", atomic_tasks=[
            pb.AtomicTask(atomic_task_id=0, command="true", timeout_seconds=60)])).SerializeToString()
        sessions = list(access.sessions.values())
        C.round_acks, C.round_target, C.round_done = 0, len(sessions), asyncio.Event()
        c0 = time.process_time()
        t0 = time.perf_counter()
        res = {"targets": len(sessions)}
        if direct:
            await asyncio.gather(*(s.ctx.write(frame) for s in sessions), return_exceptions=True)
            res["written_s"] = round(time.perf_counter() - t0, 4)
            res["write_cpu_us_per_stream"] = round(1e6 * (time.process_time() - c0) / max(1, len(sessions)), 1)
        else:
            for s in sessions:
                s.send(frame)
            res["handed_s"] = round(time.perf_counter() - t0, 4)
        try:
            await asyncio.wait_for(C.round_done.wait(), 60)
        except asyncio.TimeoutError:
            pass
        res.update(all_acked_s=round(time.perf_counter() - t0, 3), acks=C.round_acks,
                   cpu_us_per_stream=round(1e6 * (time.process_time() - c0) / max(1, len(sessions)), 1))
        out.append(res)
        C.round_done = None
        await asyncio.sleep(1.0)
    return {"rounds": out}


def parse_opt(s: str):
    k, _, v = s.partition("=")
    try:
        return k, int(v)
    except ValueError:
        return k, v


async def main(args) -> None:
    if args.tracemalloc:
        tracemalloc.start(1)
    opts = [] if args.no_base_opts else list(rpc.SERVER_OPTIONS)
    extra = [parse_opt(o) for o in args.opt]
    keys = {k for k, _ in extra}
    opts = [o for o in opts if o[0] not in keys] + extra
    server = grpc.aio.server(options=opts, maximum_concurrent_rpcs=args.max_rpcs or None)
    writer = BatchWriter(FakeDb(), 0.01)
    cls = RWAccess if args.handler == "rw" else ProbeAccess
    access = cls("probe", "127.0.0.1", args.port, writer, session_ttl_ms=86400_000,
                 heartbeat_interval_s=args.hb_interval, heartbeat_misses=1000, hello_timeout_s=120,
                 on_report=on_report)
    server.add_generic_rpc_handlers((access.handler(),))
    if args.plain:
        server.add_insecure_port(f"127.0.0.1:{args.port}")
    else:
        d = args.certs
        tls = TLSMaterial(open(f"{d}/ca.crt", "rb").read(), open(f"{d}/server.crt", "rb").read(),
                          open(f"{d}/server.key", "rb").read())
        server.add_secure_port(f"127.0.0.1:{args.port}", tls.server_credentials())
    await server.start()
    flusher = asyncio.ensure_future(writer.run())
    proc = psutil.Process()

    async def control(reader, writer_):
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = line.decode().split()
            if not cmd:
                continue
            if cmd[0] == "stats":
                res = {"started": C.started, "sessions": len(access.sessions), "reports": C.reports,
                       "rss": proc.memory_info().rss, "threads": proc.num_threads(), "fds": proc.num_fds()}
                if args.tracemalloc:
                    res["py_traced"] = tracemalloc.get_traced_memory()[0]
            elif cmd[0] == "bcast":
                res = await broadcast(access, int(cmd[1]), direct=len(cmd) > 2 and cmd[2] == "direct")
            elif cmd[0] == "trim":
                import ctypes
                before = proc.memory_info().rss
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                res = {"rss_before": before, "rss_after": proc.memory_info().rss}
            elif cmd[0] == "top" and args.tracemalloc:
                snap = tracemalloc.take_snapshot()
                res = {"top": [str(s) for s in snap.statistics("lineno")[:25]]}
            else:
                res = {"error": "unknown"}
            writer_.write((json.dumps(res) + "\n").encode())
            await writer_.drain()

    await asyncio.start_server(control, "127.0.0.1", args.control_port)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    await asyncio.Event().wait()
    flusher.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--control-port", type=int, required=True)
    p.add_argument("--certs", default="/tmp/probecerts")
    p.add_argument("--plain", action="store_true", help="plaintext instead of mutual TLS")
    p.add_argument("--handler", choices=("queue", "rw"), default="queue")
    p.add_argument("--opt", action="append", default=[], help="gRPC server option name=value (repeatable)")
    p.add_argument("--no-base-opts", action="store_true", help="leave out gse.common.rpc.SERVER_OPTIONS")
    p.add_argument("--max-rpcs", type=int, default=0, help="grpc.aio.server maximum_concurrent_rpcs")
    p.add_argument("--hb-interval", type=float, default=10.0, help="heartbeat interval told to agents")
    p.add_argument("--tracemalloc", action="store_true", help="trace Python allocations (slower)")
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args()
    if not a.no_uvloop:
        import uvloop
        uvloop.install()
    asyncio.run(main(a))
