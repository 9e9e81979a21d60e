"""Simulated agents: many agents in one process, speaking the real agent protocol over real mutual TLS.

Each simulated agent has its own bk_agent_id and leaves from its own 127.x.y.z address, holds one agent
link (gse/common/framelink.py, the real agent's transport) to a task server, heartbeats like a real agent
(a fixed host snapshot instead of sampling the host), follows redirects and reconnects with full-jitter
backoff. A link costs one file descriptor; run several of these processes to hold more agents than one
process may open files.

    python bench/simagents.py --servers 127.0.0.1:48668 --certs DIR --count 1000 --first 0 --tag ab12
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gse.common import framelink  # noqa: E402
from gse.common.address import split_host_port  # noqa: E402
from gse.common.backoff import Backoff  # noqa: E402
from gse.common.tls import TLSMaterial  # noqa: E402
from gse.pb import agent_pb2 as pb  # noqa: E402

BASE_IP = int(ipaddress.ip_address("127.64.0.0"))


def agent_id(tag: str, i: int) -> str:
    return f"{tag}{i:0{32 - len(tag)}x}"


def agent_ip(i: int) -> str:
    return str(ipaddress.ip_address(BASE_IP + i + 1))


class Stats:
    def __init__(self):
        self.attached = 0
        self.connects = 0
        self.redirects = 0
        self.failures = 0


class SimAgent:
    """One simulated agent; also its link's handler (framelink calls link_open / link_frame / link_lost)."""

    def __init__(self, i: int, tag: str, servers: list[str], ctx, stats: Stats, heartbeat_s: float, bind: bool):
        self.i = i
        self.id = agent_id(tag, i)
        self.ip = agent_ip(i)
        self.bind = bind
        self.servers = servers
        self.ctx = ctx
        self.stats = stats
        self.heartbeat_s = heartbeat_s
        self.server: str | None = None
        self.tasks_done = 0
        self.spread_s = 0.0
        self.hello_fields = dict(agent_id=self.id, cloud_id=0, ip=self.ip, hostname=f"sim-{i}", os="linux",
                                 arch="x86_64", version="0.1.0-sim", run_mode=1,
                                 start_time_ms=int(time.time() * 1000), boot_id=random.getrandbits(62))
        self.host_every = 1
        self.link = None
        self.first: asyncio.Future | None = None     # the server's answer to the hello
        self.gone: asyncio.Future | None = None      # resolved when the link ends (with a redirect, or None)
        self.beat_handle: asyncio.TimerHandle | None = None
        self.seq = 0
        self.interval = heartbeat_s

    def hello(self, redirects: int) -> bytes:
        return pb.AgentFrame(hello=pb.AgentHello(redirects=redirects, **self.hello_fields)).SerializeToString()

    async def run(self) -> None:
        idx = self.i % len(self.servers)
        backoff = Backoff(1.0, 30.0)      # as the real agent (gse.agent.agent: reconnect defaults)
        redirect, redirects = None, 0
        no_redirect_until = 0.0
        while True:
            address = redirect or self.servers[idx % len(self.servers)]
            asked = redirects or (1 if time.monotonic() < no_redirect_until else 0)
            went, connected_s = await self.session(address, asked)
            if went and redirects < 3:
                redirect, redirects = went, redirects + 1
                continue
            if redirect is not None and connected_s == 0:
                no_redirect_until = time.monotonic() + 60.0     # as the real agent: no redirects for a while
            redirect, redirects = None, 0
            if connected_s > 10:
                backoff.reset()
            idx += 1
            backoff.floor_s = self.spread_s      # as the real agent: never narrower than the spread told
            await backoff.sleep()

    async def session(self, address: str, redirects: int) -> tuple[str | None, float]:
        loop = asyncio.get_running_loop()
        host, port = split_host_port(address)
        self.stats.connects += 1
        self.first, self.gone = loop.create_future(), loop.create_future()
        started = 0.0
        try:
            self.link = await framelink.dial(self.ctx, host, port, self, server_hostname=host,
                                             local_ip=self.ip if self.bind else "", timeout=30)
            self.link.write(self.hello(redirects))
            first = await asyncio.wait_for(self.first, 30)
            if first is None:
                self.stats.failures += 1
                return None, 0.0
            kind = first.WhichOneof("body")
            if kind == "redirect":
                self.stats.redirects += 1
                return first.redirect.address, 0.0
            if kind != "welcome":
                self.stats.failures += 1
                return None, 0.0
            started = time.monotonic()
            self.server = address
            self.stats.attached += 1
            self.interval = first.welcome.heartbeat_interval_ms / 1000 or self.heartbeat_s
            self.spread_s = first.welcome.reconnect_spread_ms / 1000
            self.host_every = max(1, first.welcome.host_snapshot_every)
            # spread heartbeats over the interval; timers, not a coroutine per agent
            self.seq = 0
            self.beat_handle = loop.call_later(random.uniform(0, self.interval), self.beat)
            went = await self.gone
            return went, time.monotonic() - started
        except (OSError, asyncio.TimeoutError):
            self.stats.failures += 1
        finally:
            if self.beat_handle is not None:
                self.beat_handle.cancel()
                self.beat_handle = None
            if started:
                self.stats.attached -= 1
            if self.link is not None:
                self.link.close()
                self.link = None
        return None, (time.monotonic() - started) if started else 0.0

    def beat(self) -> None:
        # as the real agent: the host snapshot on one heartbeat in host_every, liveness on the others
        link = self.link
        if link is None:
            return
        link.write(HEARTBEAT if self.seq % self.host_every == 0 else LIVENESS)
        self.seq += 1
        self.beat_handle = asyncio.get_running_loop().call_later(self.interval, self.beat)

    # ---- the link's handler ----------------------------------------------------------------------------

    def link_open(self, link) -> None:
        pass

    def link_lost(self, link, exc) -> None:
        for f in (self.first, self.gone):
            if f is not None and not f.done():
                f.set_result(None)

    def link_frame(self, link, body) -> None:
        frame = pb.ServerFrame.FromString(body)
        if self.first is not None and not self.first.done():
            self.first.set_result(frame)
            return
        kind = frame.WhichOneof("body")
        if kind == "task":
            self.answer(link, frame.task)
        elif kind == "tune":
            self.spread_s = frame.tune.reconnect_spread_ms / 1000
        elif kind == "redirect":
            if not self.gone.done():
                self.gone.set_result(frame.redirect.address)
            link.close()

    def answer(self, link, task) -> None:
        """Answer a task in-process: `echo X` prints X, anything else succeeds silently. No fork: the
        figure measured is the control plane's, not the host's."""
        now = int(time.time() * 1000)
        report = pb.TaskReport()
        for t in task.atomic_tasks:
            out = (t.command[5:] + "\n").encode() if t.command.startswith("echo ") else b""
            if out:
                report.outputs.append(pb.TaskOutput(task_id=task.task_id, atomic_task_id=t.atomic_task_id,
                                                    offset=0, data=out))
            report.results.append(pb.TaskItemResult(
                task_id=task.task_id, atomic_task_id=t.atomic_task_id, status=2, error_code=0,
                start_time_ms=now, end_time_ms=now, exit_code=0, has_exit_code=True, output_size=len(out),
                final=True))
        link.write(pb.AgentFrame(report=report).SerializeToString())
        self.tasks_done += 1


_SNAP = pb.HostSnapshot(cpu_num=2, mem_size=8 << 30, cpu_rate=3.0, mem_rate=40.0, load1=0.1, uptime_s=3600,
                        proc_count=100, disk_total=100 << 30, disk_used=10 << 30)
HEARTBEAT = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=1, cpu_rate=0.1, mem_rate=0.2, host=_SNAP)).SerializeToString()
LIVENESS = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=2, cpu_rate=0.1, mem_rate=0.2)).SerializeToString()


async def main_async(args) -> None:
    tls = TLSMaterial((open(f"{args.certs}/ca.crt", "rb").read()), open(f"{args.certs}/agent.crt", "rb").read(),
                      open(f"{args.certs}/agent.key", "rb").read())
    ctx = framelink.client_context(tls)
    stats = Stats()
    servers = args.servers.split(",")
    agents = [SimAgent(i, args.tag, servers, ctx, stats, args.heartbeat, not args.no_bind)
              for i in range(args.first, args.first + args.count)]
    tasks = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Ramp up at a bounded rate, as a fleet coming up: a burst of thousands of handshakes at once times out.
    for n, a in enumerate(agents):
        tasks.append(asyncio.ensure_future(a.run()))
        if n % args.ramp_batch == args.ramp_batch - 1:
            await asyncio.sleep(args.ramp_pause)
        if stop.is_set():
            break

    async def report():
        while True:
            print(json.dumps({"t": round(time.time(), 3), "attached": stats.attached, "connects": stats.connects,
                              "redirects": stats.redirects, "failures": stats.failures}), flush=True)
            await asyncio.sleep(args.report_s)

    reporter = asyncio.ensure_future(report())
    await stop.wait()
    reporter.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def spawn_workers(n: int, workers: int, server: str, certs: str, tag: str, log_dir: str,
                  heartbeat: float = 10.0, ramp_rate: float = 0.0) -> list:
    """Start `workers` processes holding `n` simulated agents between them (ids and ips from `tag`);
    `ramp_rate`: agents started per second over all workers (0: each worker's default, 1,000/s)."""
    import subprocess
    per = (n + workers - 1) // workers
    procs = []
    for w in range(workers):
        count = min(per, n - w * per)
        if count <= 0:
            break
        log = open(os.path.join(log_dir, f"worker-{w}.log"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--servers", server, "--certs", certs, "--count", str(count),
             "--first", str(w * per), "--tag", tag, "--heartbeat", str(heartbeat), "--report-s", "5",
             *(["--ramp-batch", "10", "--ramp-pause", str(10 * workers / ramp_rate)] if ramp_rate > 0 else [])],
            stdout=log, stderr=subprocess.STDOUT))
    return procs


def stop_workers(procs: list) -> None:
    import subprocess
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", required=True, help="comma-separated task server addresses")
    p.add_argument("--certs", required=True, help="directory with ca.crt, agent.crt, agent.key")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0, help="index of the first agent (ids and ips derive from it)")
    p.add_argument("--tag", default="5e", help="hex prefix of the agent ids")
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--ramp-batch", type=int, default=50)
    p.add_argument("--ramp-pause", type=float, default=0.05)
    p.add_argument("--report-s", type=float, default=1.0)
    p.add_argument("--no-bind", action="store_true", help="connect from 127.0.0.1 instead of per-agent addresses")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    from gse.common import gctune
    gctune.install()            # the collector settings of the real agent (gse.common.service.main)
    asyncio.run(main_async(parse()))
