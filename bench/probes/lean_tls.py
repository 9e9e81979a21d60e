"""Probe: what a lean agent transport would cost the task server per connection, next to one gRPC TLS stream.

The transport measured: plain asyncio (stdlib loop or uvloop) + Python's `ssl` (OpenSSL), mutual TLS with the
project's certificates (gse.common.tls.init_certs; server name gse-server), and length-prefixed frames
(4-byte big-endian length + a serialized gse.pb AgentFrame / ServerFrame). Agents send a hello, get a
Welcome, then heartbeat every interval the server names (the heartbeat simagents.py sends). Heartbeats go
through the real AgentAccess._heartbeat into the real BatchWriter with a stand-in dbproxy (as
stream_server.py does), so the CPU figure is comparable with the gRPC probe's µs per heartbeat.

Server variants (one agent connection each; `--variants` picks, default all):
  a        loop.create_server(ssl=ctx), stdlib asyncio loop (its SSLProtocol: 256 KiB bytearray per connection)
  b        loop.create_server(ssl=ctx), uvloop (its SSLProtocol: 256 KiB PyMem_RawMalloc per connection)
  c        plain TCP server (uvloop) + a Protocol doing TLS itself: ssl.MemoryBIO pair + SSLContext.wrap_bio;
           ciphertext from data_received goes into the incoming BIO, plaintext is read with
           SSLObject.read(n, SHARED) into ONE per-process buffer and framed in place; only a partial frame
           is copied into the connection
  c_std    c on the stdlib asyncio loop
  c_norel  c with SSL_MODE_RELEASE_BUFFERS cleared on the SSL_CTX (CPython sets it; cleared via ctypes)
  c_burst  c where every agent sends one 64 KiB report after its Welcome and the server answers with one
           64 KiB frame: memory per idle connection after a burst (a MemoryBIO's BUF_MEM grows with the
           most bytes written into it at once, by up to 4/3, and never shrinks)
  c_burst_sliced  the same, but ciphertext goes into the incoming BIO and plaintext into SSLObject.write
           in 4 KiB slices (so neither BIO grows past a few KiB)

Per variant, two server runs: one for RSS (and CPU over --window seconds of steady heartbeats), one with
tracemalloc for the Python heap share (and its top allocation sites). N connections from 2 client processes
(uvloop + asyncio SSL; the figures are the server's). One JSON line per variant.

    flock /tmp/gse-bench.lock .venv/bin/python bench/probes/lean_tls.py --n 2000 --hb 2 --window 30 \
        --out bench/probes/results/lean_tls.jsonl
    flock /tmp/gse-bench.lock .venv/bin/python bench/probes/lean_tls.py --variants c --n 10000 --hb 10 \
        --settle 15 --window 30 --out bench/probes/results/lean_tls.jsonl
    .venv/bin/python bench/probes/lean_tls.py selftest [--slice 4096]   # variant c: split frames and records,
                                                           # frames bigger than a record, close_notify, bad certs

Roles (internal): `server`, `clients`, `selftest`, `run` (the default).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from gse.common import dbclient as db  # noqa: E402
from gse.common.errors import AgentStatus  # noqa: E402
from gse.common.records import AgentAddress, AgentIndex, AgentRecord, now_ms  # noqa: E402
from gse.common.tls import init_certs  # noqa: E402
from gse.pb import agent_pb2 as pb  # noqa: E402
from gse.taskserver.agent_access import AgentAccess, AgentSession  # noqa: E402
from gse.taskserver.batch_writer import BatchWriter  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
HDR = struct.Struct(">I")
MAX_FRAME = 16 << 20
SERVER_NAME = "gse-server"

# variant -> (uvloop?, transport, client args)
VARIANTS = {
    "a": (False, "asyncio_ssl", []),
    "b": (True, "asyncio_ssl", []),
    "c": (True, "memtls", []),
    "c_std": (False, "memtls", []),
    "c_norel": (True, "memtls", []),
    "c_burst": (True, "memtls", ["--burst-kb", "64"]),
    "c_burst_sliced": (True, "memtls", ["--burst-kb", "64"]),
}
BURST_DOWN = 64 * 1024        # in the burst variants the server answers each big report with a 64 KiB frame

# ---- TLS contexts --------------------------------------------------------------------------------------

SSL_CTRL_MODE, SSL_CTRL_CLEAR_MODE = 33, 78
SSL_MODE_RELEASE_BUFFERS = 0x10


def _libssl():
    lib = ctypes.CDLL("libssl.so.3")      # the one _ssl is linked against (already loaded)
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    return lib


def ctx_mode(ctx: ssl.SSLContext, clear: int = 0) -> int:
    """SSL_CTX mode bits of a Python SSLContext (PySSLContext's first field after the header is SSL_CTX *);
    checked by comparing SSL_CTX_get_options with ctx.options. `clear` clears bits first."""
    lib = _libssl()
    p = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    if lib.SSL_CTX_get_options(p) != ctx.options:
        raise RuntimeError("SSL_CTX pointer check failed")
    if clear:
        lib.SSL_CTX_ctrl(p, SSL_CTRL_CLEAR_MODE, clear, None)
    return lib.SSL_CTX_ctrl(p, SSL_CTRL_MODE, 0, None)


def server_ctx(d: str, tickets: int = 0) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(f"{d}/server.crt", f"{d}/server.key")
    ctx.load_verify_locations(f"{d}/ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED          # mutual TLS: the agent must show a cert of the cluster CA
    ctx.num_tickets = tickets                    # long-lived streams: no TLS 1.3 session tickets by default
    return ctx


def client_ctx(d: str, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(f"{d}/ca.crt")
    if with_cert:
        ctx.load_cert_chain(f"{d}/agent.crt", f"{d}/agent.key")
    return ctx


def frame(body: bytes) -> bytes:
    return HDR.pack(len(body)) + body


# ---- server --------------------------------------------------------------------------------------------

class FakeDb:
    async def execute(self, ops):
        return []


class C:
    conns = 0
    handshakes = 0
    hs_fail = 0
    closed = 0
    heartbeats = 0
    reports = 0
    report_bytes = 0
    bad = 0
    reads = 0


class Hub:
    access: AgentAccess = None
    welcome: bytes = b""
    burst_down: bytes = b""


SHARED = bytearray(64 * 1024)                 # per process: every connection decrypts into this
SHARED_MV = memoryview(SHARED)


class FrameConn:
    """Length-prefixed frames -> the agent-access logic. Subclasses provide send() and close()."""

    __slots__ = ()

    def _frames(self, mv) -> int:
        n, off = len(mv), 0
        while n - off >= 4:
            ln = HDR.unpack_from(mv, off)[0]
            if ln > MAX_FRAME:
                raise ValueError("frame too large")
            end = off + 4 + ln
            if end > n:
                break
            self.on_frame(mv[off + 4:end])
            off = end
        return off

    def feed(self, data) -> None:
        """`data` may be a view of the shared buffer: complete frames are parsed in place, a partial one is
        copied into the connection (self.rest) until the rest of it arrives."""
        if self.rest is None:
            off = self._frames(data)
            if off < len(data):
                self.rest = bytearray(data[off:])
        else:
            self.rest += data
            mv = memoryview(self.rest)
            try:
                off = self._frames(mv)
            finally:
                mv.release()
            del self.rest[:off]
            if not self.rest:
                self.rest = None

    def on_frame(self, body) -> None:
        f = pb.AgentFrame.FromString(body)
        kind = f.WhichOneof("body")
        s = self.session
        if s is None:
            if kind != "hello":
                C.bad += 1
                self.close()
                return
            self.attach(f.hello)
            return
        s.last_seen = time.monotonic()
        if kind == "heartbeat":
            C.heartbeats += 1
            Hub.access._heartbeat(s, f.heartbeat)
        elif kind == "report":
            C.reports += 1
            C.report_bytes += len(body)
            if len(body) > 32 * 1024 and Hub.burst_down:
                self.send(Hub.burst_down)

    def attach(self, hello) -> None:
        """What the real handler does on a hello (minus balancing): a session record, db writes, Welcome."""
        a = Hub.access
        now = time.monotonic()
        peer = self.transport.get_extra_info("peername")
        s = AgentSession(hello.agent_id, hello.cloud_id, hello.ip, hello.boot_id, f"ipv4:{peer[0]}:{peer[1]}",
                         now, now, link=self)
        old = a.sessions.get(hello.agent_id)
        if old is not None and old.link is not None:
            old.link.close()
        a.sessions[hello.agent_id] = s
        self.session = s
        at = now_ms()
        a.writer.add([AgentAddress.write(hello.cloud_id, hello.ip, hello.agent_id, a.ttl_ms),
                      AgentIndex.add([hello.agent_id], a.ttl_ms)])
        a.writer.put(AgentRecord.update(
            hello.agent_id, ttl_ms=a.ttl_ms, agent_id=hello.agent_id, cloud_id=hello.cloud_id, ip=hello.ip,
            hostname=hello.hostname, os=hello.os, arch=hello.arch, version=hello.version, run_mode=hello.run_mode,
            start_time=hello.start_time_ms, boot_id=hello.boot_id, online=True, node=a.node_id,
            connect_time=at, report_time=at, deadline=a.deadline_ms(at), status_code=AgentStatus.RUNNING,
            peer=s.peer))
        self.send(Hub.welcome)

    def detach(self) -> None:
        s = self.session
        if s is not None:
            if Hub.access.sessions.get(s.agent_id) is s:
                del Hub.access.sessions[s.agent_id]
            self.session = None


class SSLFramed(FrameConn, asyncio.Protocol):
    """Variants a/b: the loop's own SSL transport hands us plaintext."""

    __slots__ = ("transport", "rest", "session")

    def __init__(self):
        self.transport = None
        self.rest = None
        self.session = None

    def connection_made(self, transport):
        self.transport = transport
        C.conns += 1
        C.handshakes += 1        # asyncio calls connection_made after the TLS handshake

    def data_received(self, data):
        try:
            self.feed(data)
        except Exception:  # noqa: BLE001 - a broken frame ends this connection
            C.bad += 1
            self.close()

    def send(self, body: bytes) -> None:
        self.transport.write(HDR.pack(len(body)) + body)

    def close(self) -> None:
        self.transport.close()

    def connection_lost(self, exc):
        C.closed += 1
        self.detach()


class MemTLS(FrameConn, asyncio.Protocol):
    """Variant c: TLS done here with a MemoryBIO pair; no per-connection read buffer."""

    __slots__ = ("transport", "inc", "out", "obj", "ready", "rest", "session")

    ctx: ssl.SSLContext = None
    slice = 0                      # >0: feed the BIOs at most this many bytes at a time

    def __init__(self):
        self.transport = None
        self.rest = None
        self.session = None
        self.ready = False

    def connection_made(self, transport):
        self.transport = transport
        C.conns += 1
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = self.ctx.wrap_bio(self.inc, self.out, server_side=True)

    def _flush(self) -> None:
        if self.out.pending:
            self.transport.write(self.out.read())

    def data_received(self, data):
        C.reads += 1
        k = self.slice
        if k and len(data) > k:
            mv = memoryview(data)
            for i in range(0, len(data), k):
                if self.obj is None:
                    return
                self._received(mv[i:i + k])
            return
        self._received(data)

    def _received(self, data):
        obj = self.obj
        if obj is None:                    # closed; bytes still arriving
            return
        self.inc.write(data)
        if not self.ready:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError):
                C.hs_fail += 1
                self._flush()              # the alert, if any
                self.obj = None
                self.transport.close()
                return
            self.ready = True
            C.handshakes += 1
            self._flush()
        try:
            while True:
                n = obj.read(len(SHARED), SHARED)
                if not n:
                    self.close()
                    return
                self.feed(SHARED_MV[:n])
                if self.obj is None:       # closed while handling a frame
                    return
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:     # close_notify
            self.close()
            return
        except Exception:  # noqa: BLE001 - bad record or broken frame: end this connection
            C.bad += 1
            self.close()
            return
        if self.out.pending:               # e.g. a KeyUpdate answer
            self._flush()

    def send(self, body: bytes) -> None:
        if self.obj is None:
            return
        data = HDR.pack(len(body)) + body
        k = self.slice
        if k and len(data) > k:
            mv = memoryview(data)
            for i in range(0, len(data), k):
                self.obj.write(mv[i:i + k])
                self.transport.write(self.out.read())
            return
        self.obj.write(data)
        self.transport.write(self.out.read())

    def close(self) -> None:
        if self.obj is not None and self.ready:
            try:
                self.obj.unwrap()          # send close_notify
            except ssl.SSLError:
                pass
            self._flush()
        self.obj = None
        self.transport.close()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        C.closed += 1
        self.obj = self.inc = self.out = None
        self.detach()


def make_hub(hb_interval: float) -> BatchWriter:
    writer = BatchWriter(FakeDb(), 0.01)
    Hub.access = AgentAccess("probe", "127.0.0.1", 0, writer, session_ttl_ms=86400_000,
                             heartbeat_interval_s=hb_interval, heartbeat_misses=1000, hello_timeout_s=120)
    Hub.welcome = pb.ServerFrame(welcome=pb.Welcome(node_id="probe", heartbeat_interval_ms=int(hb_interval * 1000),
                                                    parent_ip="127.0.0.1", parent_port=0)).SerializeToString()
    return writer


async def start_listener(variant: str, port: int, sctx: ssl.SSLContext):
    loop = asyncio.get_running_loop()
    transport = VARIANTS[variant][1]
    if transport == "asyncio_ssl":
        return await loop.create_server(SSLFramed, "127.0.0.1", port, ssl=sctx, backlog=4096, reuse_address=True,
                                        ssl_handshake_timeout=60)
    MemTLS.ctx = sctx
    return await loop.create_server(MemTLS, "127.0.0.1", port, backlog=4096, reuse_address=True)


def rss_anon() -> tuple[int, int]:
    rss = anon = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Anonymous:"):
                anon = int(line.split()[1])
    return rss, anon


async def server_main(args) -> None:
    if args.tracemalloc:
        tracemalloc.start(1)
    sctx = server_ctx(args.certs, args.tickets)
    mode = ctx_mode(sctx, SSL_MODE_RELEASE_BUFFERS if args.variant == "c_norel" else 0)
    writer = make_hub(args.hb)
    if args.variant.startswith("c_burst"):
        Hub.burst_down = pb.ServerFrame(task=pb.TaskRequest(task_id="burst", atomic_tasks=[pb.AtomicTask(
            atomic_task_id=0, command="z" * BURST_DOWN)])).SerializeToString()
    if args.variant == "c_burst_sliced":
        MemTLS.slice = 4096
    lsn = await start_listener(args.variant, args.port, sctx)
    flusher = asyncio.ensure_future(writer.run())

    async def control(reader, w):
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = line.decode().split()
            if not cmd:
                continue
            if cmd[0] == "stats":
                rss, anon = rss_anon()
                res = {"conns": C.conns, "handshakes": C.handshakes, "hs_fail": C.hs_fail, "closed": C.closed,
                       "sessions": len(Hub.access.sessions), "heartbeats": C.heartbeats, "reports": C.reports,
                       "bad": C.bad, "rss_kb": rss, "anon_kb": anon, "cpu_s": sum(os.times()[:2]),
                       "ssl_mode": hex(mode)}
                if args.tracemalloc:
                    res["py_traced"] = tracemalloc.get_traced_memory()[0]
            elif cmd[0] == "trim":
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                rss, anon = rss_anon()
                res = {"rss_kb": rss, "anon_kb": anon}
            elif cmd[0] == "top" and args.tracemalloc:
                snap = tracemalloc.take_snapshot()
                res = {"top": [str(s) for s in snap.statistics("lineno")[:6]]}
            else:
                res = {"error": "unknown"}
            w.write((json.dumps(res) + "\n").encode())
            await w.drain()

    ctl_srv = await asyncio.start_server(control, "127.0.0.1", args.control_port)
    print(json.dumps({"ready": True, "pid": os.getpid(), "ssl_mode": hex(mode),
                      "port": lsn.sockets[0].getsockname()[1],
                      "control_port": ctl_srv.sockets[0].getsockname()[1]}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    flusher.cancel()


# ---- clients -------------------------------------------------------------------------------------------

class CS:
    welcomed = 0
    lost = 0
    errors: dict = {}
    frames = 0


class Agent(asyncio.Protocol):
    def __init__(self, hello: bytes, hb: bytes, burst: bytes | None, done: asyncio.Future):
        self.hello, self.hb, self.burst, self.done = hello, hb, burst, done
        self.t = None
        self.buf = b""
        self.timer = None
        self.welcomed = False

    def connection_made(self, t):
        self.t = t
        t.write(frame(self.hello))

    def data_received(self, data):
        self.buf += data
        while len(self.buf) >= 4:
            ln = HDR.unpack_from(self.buf)[0]
            if len(self.buf) < 4 + ln:
                break
            f = pb.ServerFrame.FromString(self.buf[4:4 + ln])
            self.buf = self.buf[4 + ln:]
            CS.frames += 1
            if f.WhichOneof("body") == "welcome" and not self.welcomed:
                self.welcomed = True
                CS.welcomed += 1
                if self.burst is not None:
                    self.t.write(frame(self.burst))
                interval = f.welcome.heartbeat_interval_ms / 1000
                loop = asyncio.get_running_loop()
                self.timer = loop.call_later(random.uniform(0, interval), self.beat, interval)

    def beat(self, interval: float) -> None:
        self.t.write(frame(self.hb))
        self.timer = asyncio.get_running_loop().call_later(interval, self.beat, interval)

    def connection_lost(self, exc):
        if self.timer is not None:
            self.timer.cancel()
        if self.welcomed:
            CS.welcomed -= 1
        CS.lost += 1
        if not self.done.done():
            self.done.set_result(None)


async def one_agent(i: int, args, cctx, hb: bytes, burst) -> None:
    hello = pb.AgentFrame(hello=pb.AgentHello(
        agent_id=f"lean{args.first + i:028x}", cloud_id=0, ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
        hostname=f"lean-{i}", os="linux", arch="x86_64", version="probe", run_mode=1,
        start_time_ms=int(time.time() * 1000), boot_id=random.getrandbits(62))).SerializeToString()
    loop = asyncio.get_running_loop()
    for attempt in range(5):                 # bounded reconnects
        done = loop.create_future()
        try:
            await loop.create_connection(lambda: Agent(hello, hb, burst, done), "127.0.0.1", args.port,
                                         ssl=cctx, server_hostname=SERVER_NAME, ssl_handshake_timeout=60)
            await done
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            k = type(exc).__name__ + ": " + str(exc)[:80]
            CS.errors[k] = CS.errors.get(k, 0) + 1
        await asyncio.sleep(random.uniform(0.5, 2.0))


async def clients_main(args) -> None:
    cctx = client_ctx(args.certs)
    snap = pb.HostSnapshot(cpu_num=2, mem_size=8 << 30, cpu_rate=3.0, mem_rate=40.0, load1=0.1, uptime_s=3600,
                           proc_count=100, disk_total=100 << 30, disk_used=10 << 30)
    hb = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=1, cpu_rate=0.1, mem_rate=0.2, host=snap)).SerializeToString()
    burst = None
    if args.burst_kb:
        burst = pb.AgentFrame(report=pb.TaskReport(results=[pb.TaskItemResult(
            task_id="burst", status=2, error_msg="x" * (args.burst_kb * 1024))])).SerializeToString()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def report():
        while True:
            print(json.dumps({"welcomed": CS.welcomed, "lost": CS.lost, "errors": CS.errors}), flush=True)
            await asyncio.sleep(2)

    rep = asyncio.ensure_future(report())
    tasks = []
    for i in range(args.count):
        tasks.append(asyncio.ensure_future(one_agent(i, args, cctx, hb, burst)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
        if stop.is_set():
            break
    await stop.wait()
    rep.cancel()
    print(json.dumps({"welcomed": CS.welcomed, "lost": CS.lost, "errors": CS.errors}), flush=True)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---- self-test of variant c ------------------------------------------------------------------------------

class RawTLSClient:
    """A client doing TLS over a raw non-blocking socket, to control exactly how bytes hit the wire."""

    def __init__(self, port: int, cctx: ssl.SSLContext):
        self.port, self.cctx = port, cctx
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = cctx.wrap_bio(self.inc, self.out, server_hostname=SERVER_NAME)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.plain = b""

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        for _ in range(50):
            try:
                self.obj.do_handshake()
                await self.flush()
                return
            except ssl.SSLWantReadError:
                await self.flush()
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), 5)
                if not data:
                    raise ConnectionError("closed during handshake")
                self.inc.write(data)
        raise RuntimeError("handshake did not finish")

    async def flush(self, chunk: int = 0, pause: float = 0.0) -> None:
        data = self.out.read()
        loop = asyncio.get_running_loop()
        if not chunk:
            if data:
                await loop.sock_sendall(self.sock, data)
            return
        for i in range(0, len(data), chunk):
            await loop.sock_sendall(self.sock, data[i:i + chunk])
            await asyncio.sleep(pause)

    async def recv_frame(self, timeout: float = 5):
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            if len(self.plain) >= 4:
                ln = HDR.unpack_from(self.plain)[0]
                if len(self.plain) >= 4 + ln:
                    body, self.plain = self.plain[4:4 + ln], self.plain[4 + ln:]
                    return pb.ServerFrame.FromString(body)
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), max(0.01, deadline - time.monotonic()))
            if not data:
                return None
            self.inc.write(data)
            try:
                while True:
                    chunk = self.obj.read(65536)
                    if not chunk:
                        break
                    self.plain += chunk
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return None


async def wait_for(cond, timeout: float = 5) -> bool:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            return False
        await asyncio.sleep(0.01)
    return True


async def selftest_main(args) -> None:
    d = args.certs
    init_certs(d, shared_agent=True)
    sctx = server_ctx(d, args.tickets)
    mode = ctx_mode(sctx)
    writer = make_hub(2.0)
    flusher = asyncio.ensure_future(writer.run())
    MemTLS.slice = args.slice
    srv = await start_listener("c", args.port, sctx)
    port = srv.sockets[0].getsockname()[1]
    checks = {"slice": args.slice, "ssl_mode": hex(mode),
              "release_buffers_set_by_cpython": bool(mode & SSL_MODE_RELEASE_BUFFERS)}
    cl = RawTLSClient(port, client_ctx(d))
    await cl.connect()
    hello = pb.AgentFrame(hello=pb.AgentHello(agent_id="selftest-agent", ip="10.0.0.1")).SerializeToString()
    cl.obj.write(frame(hello))
    reads0 = C.reads
    await cl.flush(chunk=1, pause=0.002)          # ciphertext one byte per TCP segment
    w = await cl.recv_frame()
    checks["hello_server_reads"] = C.reads - reads0
    checks["welcome_after_1_byte_segments"] = w is not None and w.WhichOneof("body") == "welcome"
    checks["session"] = "selftest-agent" in Hub.access.sessions
    hb = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=1)).SerializeToString()
    cl.obj.write(frame(hb) * 3)                   # three frames in one record
    await cl.flush()
    f = frame(hb)
    cl.obj.write(f[:2])                           # the length header split over two records ...
    cl.obj.write(f[2:7])
    await cl.flush()
    await asyncio.sleep(0.05)
    cl.obj.write(f[7:])                           # ... and the body over two TCP segments
    await cl.flush(chunk=5, pause=0.002)
    checks["heartbeats_4"] = await wait_for(lambda: C.heartbeats == 4)
    big = pb.AgentFrame(report=pb.TaskReport(results=[pb.TaskItemResult(
        task_id="big", error_msg="y" * 200_000)])).SerializeToString()
    cl.obj.write(frame(big) + frame(hb))          # > shared buffer, > one TLS record, then one more frame
    await cl.flush(chunk=1000)
    checks["report_200k_then_heartbeat"] = await wait_for(lambda: C.reports == 1 and C.heartbeats == 5) \
        and C.report_bytes == len(big)
    sess = Hub.access.sessions["selftest-agent"]
    big_down = pb.ServerFrame(task=pb.TaskRequest(task_id="t", atomic_tasks=[
        pb.AtomicTask(atomic_task_id=0, command="z" * 150_000)])).SerializeToString()
    sess.link.send(big_down)
    got = await cl.recv_frame()
    checks["server_sends_150k_frame"] = got is not None and len(got.task.atomic_tasks[0].command) == 150_000
    try:
        cl.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    await cl.flush()
    checks["close_notify_ends_session"] = await wait_for(lambda: "selftest-agent" not in Hub.access.sessions)
    cl.sock.close()
    # an agent without a client certificate, and one with a cert from another CA
    other = os.path.join(d, "other")
    init_certs(other, shared_agent=True)
    for name, cctx in (("no_client_cert_refused", client_ctx(d, with_cert=False)),
                       ("foreign_ca_cert_refused", client_ctx(d))):
        if name.startswith("foreign"):
            cctx.load_cert_chain(f"{other}/agent.crt", f"{other}/agent.key")
        before = C.hs_fail
        bad = RawTLSClient(port, cctx)
        ok = False
        try:
            await bad.connect()
            bad.obj.write(frame(hello))
            await bad.flush()
            ok = await bad.recv_frame(2) is None        # TLS 1.3: the client learns only on its next read
        except (ssl.SSLError, ConnectionError, OSError, asyncio.TimeoutError):
            ok = True
        checks[name] = ok and await wait_for(lambda: C.hs_fail == before + 1) and not Hub.access.sessions
        bad.sock.close()
    srv.close()
    flusher.cancel()
    checks["ok"] = all(v for k, v in checks.items() if k not in ("ssl_mode", "slice"))
    print(json.dumps({"selftest": "variant c", **checks}), flush=True)
    if not checks["ok"]:
        sys.exit(1)


# ---- driver --------------------------------------------------------------------------------------------

def ctl(port: int, cmd: str) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall((cmd + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def one_run(args, variant: str, traced: bool) -> dict:
    # port 0 (default): the server binds free ports and says which (loopback is busy with other runs'
    # ephemeral ports, so fixed ports can collide)
    cmd = [PY, __file__, "server", "--variant", variant, "--port", str(args.port),
           "--control-port", str(args.port + 1 if args.port else 0),
           "--certs", args.certs, "--hb", str(args.hb), "--tickets", str(args.tickets)]
    if traced:
        cmd.append("--tracemalloc")
    log = f"/tmp/lean-server-{os.getpid()}.log"
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    clients, out = [], {}
    try:
        ready = json.loads(srv.stdout.readline())
        port, cport = ready["port"], ready["control_port"]
        out["ssl_mode"] = ready["ssl_mode"]
        time.sleep(2)
        st0 = ctl(cport, "stats")
        per = args.n // args.procs
        t0 = time.monotonic()
        for p in range(args.procs):
            clients.append(subprocess.Popen(
                [PY, __file__, "clients", "--port", str(port), "--count", str(per), "--first", str(p * per),
                 "--certs", args.certs, *VARIANTS[variant][2]],
                stdout=open(f"/tmp/lean-client-{os.getpid()}-{p}.log", "w"), stderr=subprocess.STDOUT))
        last, last_change = -1, time.monotonic()
        while True:
            st = ctl(cport, "stats")
            if st["sessions"] != last:
                last, last_change = st["sessions"], time.monotonic()
            if st["sessions"] >= per * args.procs or time.monotonic() - t0 > 240 \
                    or time.monotonic() - last_change > 20:
                break
            time.sleep(0.5)
        out["attach_s"] = round(time.monotonic() - t0, 1)
        out["attach_cpu_ms_per_conn"] = round(1000 * (st["cpu_s"] - st0["cpu_s"]) / max(1, st["sessions"]), 2)
        time.sleep(args.settle)
        st1 = ctl(cport, "stats")
        held = max(1, st1["sessions"])
        out.update(held=st1["sessions"], rss_idle_mb=round(st0["rss_kb"] / 1024, 1),
                   rss_mb=round(st1["rss_kb"] / 1024, 1),
                   rss_kb_per_conn=round((st1["rss_kb"] - st0["rss_kb"]) / held, 1),
                   anon_kb_per_conn=round((st1["anon_kb"] - st0["anon_kb"]) / held, 1))
        if traced:
            out["py_kb_per_conn"] = round((st1["py_traced"] - st0["py_traced"]) / 1024 / held, 1)
            out["top"] = ctl(cport, "top")["top"]
        elif args.window:
            w0 = time.monotonic()
            time.sleep(args.window)
            st2 = ctl(cport, "stats")
            wall = time.monotonic() - w0
            cpu = st2["cpu_s"] - st1["cpu_s"]
            hbs = st2["heartbeats"] - st1["heartbeats"]
            out.update(cpu_pct=round(100 * cpu / wall, 1), hb_per_s=round(hbs / wall, 1),
                       cpu_us_per_heartbeat=round(1e6 * cpu / max(1, hbs), 1),
                       rss_kb_per_conn_after_window=round((st2["rss_kb"] - st0["rss_kb"]) / held, 1))
            st1 = st2
        if not traced:
            tr = ctl(cport, "trim")     # what is live vs freed-but-kept glibc heap
            out["rss_kb_per_conn_after_malloc_trim"] = round((tr["rss_kb"] - st0["rss_kb"]) / held, 1)
        out.update(hs_fail=st1["hs_fail"], closed=st1["closed"], bad=st1["bad"], reports=st1["reports"])
    finally:
        for c in clients:
            c.send_signal(signal.SIGTERM)
        for c in clients:
            try:
                c.wait(20)
            except subprocess.TimeoutExpired:
                c.kill()
        srv.kill()
        srv.wait()
    last = []
    for p in range(len(clients)):
        with open(f"/tmp/lean-client-{os.getpid()}-{p}.log") as f:
            lines = [ln for ln in f.read().splitlines() if ln.startswith("{")]
        if lines:
            last.append(json.loads(lines[-1]))
    out["clients_last"] = last
    return out


def run_main(args) -> None:
    init_certs(args.certs, shared_agent=True)
    for v in args.variants.split(","):
        res = {"variant": v, "n": args.n, "procs": args.procs, "hb_s": args.hb, "uvloop": VARIANTS[v][0],
               "transport": VARIANTS[v][1], "date": time.strftime("%Y-%m-%d")}
        mem = one_run(args, v, traced=False)
        res.update(mem)
        if not args.no_tracemalloc:
            tr = one_run(args, v, traced=True)
            res.update(tracemalloc_kb_per_conn=tr["py_kb_per_conn"],
                       tracemalloc_run_rss_kb_per_conn=tr["rss_kb_per_conn"],
                       tracemalloc_top=tr["top"])
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


def main() -> None:
    role = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in ("server", "clients", "selftest", "run") else "run"
    argv = sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == role else sys.argv[1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="0: free ports chosen by the server")
    p.add_argument("--certs", default="/tmp/leantls-certs")
    p.add_argument("--tickets", type=int, default=0, help="TLS 1.3 session tickets the server sends")
    if role == "server":
        p.add_argument("--variant", choices=sorted(VARIANTS), required=True)
        p.add_argument("--control-port", type=int, required=True)
        p.add_argument("--hb", type=float, default=2.0)
        p.add_argument("--tracemalloc", action="store_true")
    elif role == "clients":
        p.add_argument("--count", type=int, required=True)
        p.add_argument("--first", type=int, default=0)
        p.add_argument("--burst-kb", type=int, default=0)
    elif role == "selftest":
        p.add_argument("--slice", type=int, default=0, help="MemTLS.slice (0 = whole writes)")
    elif role == "run":
        p.add_argument("--variants", default=",".join(VARIANTS))
        p.add_argument("--n", type=int, default=2000)
        p.add_argument("--procs", type=int, default=2)
        p.add_argument("--hb", type=float, default=2.0, help="heartbeat interval (s) the server names")
        p.add_argument("--settle", type=float, default=10.0)
        p.add_argument("--window", type=float, default=20.0, help="CPU window (s); 0 = none")
        p.add_argument("--no-tracemalloc", action="store_true")
        p.add_argument("--out", default="")
    args = p.parse_args(argv)
    use_uv = True
    if role == "server":
        use_uv = VARIANTS[args.variant][0]
    if role in ("server", "clients", "selftest") and use_uv:
        import uvloop
        uvloop.install()
    if role == "server":
        asyncio.run(server_main(args))
    elif role == "clients":
        asyncio.run(clients_main(args))
    elif role == "selftest":
        asyncio.run(selftest_main(args))
    else:
        run_main(args)


if __name__ == "__main__":
    main()
