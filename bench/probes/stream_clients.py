"""Probe clients: COUNT agent streams in one process, one channel (one TCP/TLS connection) per stream.

(With --shared-connection, channels with equal target and options share one connection per process,
gRPC's default for plaintext channels; secure channels get their own since each has its own credentials.)

Driven by `run_probe.py`. Each stream speaks the agent protocol: hello first, wait for Welcome, heartbeat
every interval the server names (spread with jitter), answer every TaskRequest with a TaskReport. With
--no-hello a stream is opened and then left silent (headers only): the shape of the probe note's
"4,300 handlers" case. With --relay each stream leaves from its own 127.x.y.z through gse.agent.relay
(two extra fds per agent). Prints one JSON line per --report-s with its counters.

    python bench/probes/stream_clients.py --target 127.0.0.1:50100 --count 2000 --first 0
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import grpc  # noqa: E402

from gse.agent.relay import SourceRelay  # noqa: E402
from gse.common import rpc  # noqa: E402
from gse.common.rpc import identity  # noqa: E402
from gse.common.tls import TLSMaterial  # noqa: E402
from gse.pb import agent_pb2 as pb  # noqa: E402

CONNECT = "/gse.pb.AgentAccess/Connect"
BASE_IP = int(ipaddress.ip_address("127.80.0.0"))


class St:
    welcomed = 0
    md_sent = 0
    tasks = 0
    errors: dict[str, int] = {}


def parse_opt(s: str):
    k, _, v = s.partition("=")
    try:
        return k, int(v)
    except ValueError:
        return k, v


async def agent(i: int, args, tls, opts, hb_frame: bytes) -> None:
    """One agent: a session, and on an error another one after 0.5-2 s (the error is counted)."""
    relay = None
    if args.relay:
        relay = SourceRelay(str(ipaddress.ip_address(BASE_IP + i + 1)))
        host, _, port = args.target.rpartition(":")
        relay.target = (host, int(port))
        await relay.start()
    try:
        while True:
            try:
                await session(i, args, tls, opts, hb_frame, relay)
            except grpc.aio.AioRpcError as exc:
                key = f"{exc.code().name}: {exc.details()}"[:200]
                St.errors[key] = St.errors.get(key, 0) + 1
            await asyncio.sleep(random.uniform(0.5, 2.0))
    finally:
        if relay is not None:
            await relay.stop()


async def session(i: int, args, tls, opts, hb_frame: bytes, relay) -> None:
    target = args.target
    extra = []
    if relay is not None:
        host = relay.target[0]
        target = relay.grpc_target
        extra = [("grpc.default_authority", args.target)]
        if tls is not None:
            extra.append(("grpc.ssl_target_name_override", host))
    if tls is None:
        channel = grpc.aio.insecure_channel(target, options=opts + extra)
    else:
        channel = grpc.aio.secure_channel(target, tls.channel_credentials(), options=opts + extra)
    call = channel.stream_stream(CONNECT, request_serializer=identity,
                                 response_deserializer=pb.ServerFrame.FromString)()
    try:
        if args.no_hello:
            await call.wait_for_connection()
            St.md_sent += 1
            await call.read()
            return
        hello = pb.AgentFrame(hello=pb.AgentHello(agent_id=f"probe{args.first + i:027x}", cloud_id=0,
                                                  ip=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
                                                  hostname=f"p{i}", os="linux", version="probe"))
        await call.write(hello.SerializeToString())
        first = await call.read()
        if first is grpc.aio.EOF:
            return
        St.welcomed += 1
        interval = (first.welcome.heartbeat_interval_ms or 10_000) / 1000
        lock = asyncio.Lock()

        async def beat():
            await asyncio.sleep(random.uniform(0, interval))
            while True:
                async with lock:
                    await call.write(hb_frame)
                await asyncio.sleep(interval)

        beater = asyncio.ensure_future(beat()) if not args.no_heartbeat else None
        try:
            while True:
                frame = await call.read()
                if frame is grpc.aio.EOF:
                    break
                if frame.WhichOneof("body") == "task":
                    t = frame.task
                    rep = pb.AgentFrame(report=pb.TaskReport(results=[pb.TaskItemResult(
                        task_id=t.task_id, atomic_task_id=a.atomic_task_id, status=2, exit_code=0,
                        has_exit_code=True, final=True) for a in t.atomic_tasks]))
                    async with lock:
                        await call.write(rep.SerializeToString())
                    St.tasks += 1
        finally:
            if beater is not None:
                beater.cancel()
            St.welcomed -= 1
    finally:
        call.cancel()
        await channel.close()


async def main(args) -> None:
    tls = None
    if not args.plain:
        d = args.certs
        tls = TLSMaterial(open(f"{d}/ca.crt", "rb").read(), open(f"{d}/agent.crt", "rb").read(),
                          open(f"{d}/agent.key", "rb").read())
    opts = list(rpc.CHANNEL_OPTIONS) if not args.no_base_opts else []
    extra = [parse_opt(o) for o in args.opt]
    keys = {k for k, _ in extra}
    opts = [o for o in opts if o[0] not in keys] + extra
    if not args.shared_connection:
        # Channels with equal target and args share one subchannel (one TCP connection) per process by
        # default; agents each have their own connection, so give every channel its own subchannel pool.
        opts.append(("grpc.use_local_subchannel_pool", 1))
    snap = pb.HostSnapshot(cpu_num=2, mem_size=8 << 30, cpu_rate=3.0, mem_rate=40.0, load1=0.1, uptime_s=3600,
                           proc_count=100, disk_total=100 << 30, disk_used=10 << 30)
    hb = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=1, cpu_rate=0.1, mem_rate=0.2, host=snap)).SerializeToString()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    async def report():
        while True:
            print(json.dumps({"t": round(time.time(), 2), "welcomed": St.welcomed, "md_sent": St.md_sent,
                              "tasks": St.tasks, "errors": St.errors}), flush=True)
            await asyncio.sleep(args.report_s)

    rep = asyncio.ensure_future(report())
    tasks = []
    for i in range(args.count):
        tasks.append(asyncio.ensure_future(agent(i, args, tls, opts, hb)))
        if i % args.ramp_batch == args.ramp_batch - 1:
            await asyncio.sleep(args.ramp_pause)
        if stop.is_set():
            break
    await stop.wait()
    rep.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--certs", default="/tmp/probecerts")
    p.add_argument("--plain", action="store_true")
    p.add_argument("--no-hello", action="store_true", help="open the stream and send nothing")
    p.add_argument("--no-heartbeat", action="store_true")
    p.add_argument("--relay", action="store_true", help="per-agent 127.x source address through the relay")
    p.add_argument("--opt", action="append", default=[], help="gRPC channel option name=value (repeatable)")
    p.add_argument("--shared-connection", action="store_true",
                   help="let channels share one connection per process (gRPC's global subchannel pool)")
    p.add_argument("--no-base-opts", action="store_true", help="leave out gse.common.rpc.CHANNEL_OPTIONS")
    p.add_argument("--ramp-batch", type=int, default=50)
    p.add_argument("--ramp-pause", type=float, default=0.05)
    p.add_argument("--report-s", type=float, default=2.0)
    a = p.parse_args()
    import uvloop
    uvloop.install()
    asyncio.run(main(a))
