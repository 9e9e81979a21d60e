"""Simulated agents: many agents in one process, speaking the real agent protocol over real mutual TLS.

Each simulated agent has its own bk_agent_id and leaves from its own 127.x.y.z address, holds one agent
link (gse/common/framelink.py, the real agent's transport) to a task server, heartbeats like a real agent
(a fixed host snapshot instead of sampling the host), follows redirects and reconnects with full-jitter
backoff. A link costs one file descriptor; run several of these processes to hold more agents than one
process may open files.

Identity (--identity), as the cluster's checks want it:
  issued   each agent has its own certificate naming its id (--bundle: JSON lines {"i", "cert", "key"},
           made by `prepare` below with the cluster CA, as an operator would with `gse certs issue`)
  enroll   each agent makes its key and enrolls with a one-time token (--tokens: one per line, line k for
           agent --first + k), exactly as the real agent does, then attaches with its new certificate
  shared   one certificate naming no agent (DIR/agent.crt; the cluster must be in shared-certificate mode)

    python bench/simagents.py --servers 127.0.0.1:48668 --certs DIR --count 1000 --first 0 --tag ab12 \
        --identity issued --bundle agents-0.jsonl
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
from gse.common.tls import TLSMaterial, make_csr, new_key, pem_key  # noqa: E402
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
        self.answered = 0       # tasks answered
        self.duplicates = 0     # tasks delivered again after they were answered (not run twice)
        self.enrolled = 0
        self.enroll_failures = 0
        self.identities = 0     # host identity files "written"
        self.refused: dict[str, int] = {}


class Identity:
    """Where a simulated agent's TLS context comes from (see the module docstring)."""

    def __init__(self, mode: str, certs: str, bundle: str = "", tokens: str = ""):
        self.mode = mode
        self.ca = open(f"{certs}/ca.crt", "rb").read()
        self.shared = None
        self.pairs: dict[int, tuple[bytes, bytes]] = {}
        self.tokens: list[str] = []
        if mode == "shared":
            self.shared = framelink.client_context(TLSMaterial.from_dir(certs, "agent"))
        elif mode == "issued":
            with open(bundle) as f:
                for line in f:
                    d = json.loads(line)
                    self.pairs[d["i"]] = (d["cert"].encode(), d["key"].encode())
        elif mode == "enroll":
            with open(tokens) as f:
                self.tokens = [t.strip() for t in f if t.strip()]
            self.no_cert = framelink.client_context(TLSMaterial(self.ca, b"", b""), with_certificate=False)
        else:
            raise SystemExit(f"--identity {mode}: not issued, enroll or shared")

    def context(self, i: int):
        """The agent's own context, made once (26 KB and ~2 ms each: made when the agent first connects)."""
        if self.shared is not None:
            return self.shared
        cert, key = self.pairs.pop(i)
        return framelink.client_context(TLSMaterial(self.ca, cert, key))


class SimAgent:
    """One simulated agent; also its link's handler (framelink calls link_open / link_frame / link_lost)."""

    def __init__(self, i: int, tag: str, servers: list[str], identity: Identity, stats: Stats, heartbeat_s: float,
                 bind: bool, token: str = "", cloud_id: int = 0, server_name: str = ""):
        self.i = i
        self.id = agent_id(tag, i)
        self.ip = agent_ip(i)
        self.bind = bind
        self.servers = servers
        self.identity = identity
        self.token = token
        self.ctx = None
        self.stats = stats
        self.heartbeat_s = heartbeat_s
        self.server: str | None = None
        self.tasks_done = 0
        self.seen: set[str] = set()                  # task ids answered (a task delivered twice runs once)
        self.unacked: dict[tuple[str, int], pb.TaskReport] = {}   # as the real agent: kept until acknowledged
        self.spread_s = 0.0
        self.server_name = server_name          # "" = the dialled host
        self.hello_fields = dict(agent_id=self.id, cloud_id=cloud_id, ip=self.ip, hostname=f"sim-{i}", os="linux",
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

    async def enroll(self) -> None:
        """As the real agent: key made here, CSR with the token, certificate back, then our own context."""
        key = new_key()
        frame = pb.AgentFrame(enroll=pb.Enroll(token=self.token, agent_id=self.id,
                                               csr=make_csr(key, self.id))).SerializeToString()
        backoff = Backoff(1.0, 30.0)      # as the real agent (gse.agent.agent: reconnect defaults)
        while True:
            address = self.servers[(self.i + backoff.attempt) % len(self.servers)]
            host, port = split_host_port(address)
            loop = asyncio.get_running_loop()
            self.first, self.gone = loop.create_future(), loop.create_future()
            link = None
            try:
                link = await framelink.dial(self.identity.no_cert, host, port, self, server_hostname=host,
                                            local_ip=self.ip if self.bind else "", timeout=30)
                link.write(frame)
                answer = await asyncio.wait_for(self.first, 30)
            except (OSError, asyncio.TimeoutError):
                answer = None
            finally:
                if link is not None:
                    link.close()
            if answer is not None and answer.WhichOneof("body") == "enrolled":
                self.ctx = framelink.client_context(TLSMaterial(self.identity.ca, answer.enrolled.certificate,
                                                                pem_key(key)))
                self.stats.enrolled += 1
                return
            self.stats.enroll_failures += 1
            if answer is not None and answer.WhichOneof("body") == "refused":
                code = answer.refused.code or "refused"
                self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
            await backoff.sleep()

    async def run(self) -> None:
        if self.identity.mode == "enroll":
            await self.enroll()
        else:
            self.ctx = self.identity.context(self.i)
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
            self.link = await framelink.dial(self.ctx, host, port, self, server_hostname=self.server_name or host,
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
                if kind == "refused":
                    code = first.refused.code or "refused"
                    self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
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
            for report in {id(r): r for r in self.unacked.values()}.values():     # as the real agent: resend
                self.link.write(pb.AgentFrame(report=report).SerializeToString())
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
            task = frame.task
            if task.task_id in self.seen:
                self.stats.duplicates += 1
                return
            self.seen.add(task.task_id)
            delay = _delay(task)
            if delay:
                asyncio.get_running_loop().call_later(delay, self.answer, task)
            else:
                self.answer(task)
        elif kind == "ack":
            for ref in frame.ack.items:
                self.unacked.pop((ref.task_id, ref.atomic_task_id), None)
        elif kind == "proc_ops":
            self.answer_proc(link, frame.proc_ops)
        elif kind == "host_identity":
            # as the real agent (gse/agent/hostid.py), without writing a file: the md5 it would now have
            h = frame.host_identity
            self.stats.identities += 1
            link.write(pb.AgentFrame(host_identity_result=pb.HostIdentityResult(md5=h.md5, version=h.version))
                       .SerializeToString())
        elif kind == "tune":
            self.spread_s = frame.tune.reconnect_spread_ms / 1000
        elif kind == "redirect":
            if not self.gone.done():
                self.gone.set_result(frame.redirect.address)
            link.close()

    def answer(self, task) -> None:
        """Answer a task in-process: `echo X` prints X, anything else succeeds silently (`sleep S; ...`
        answers S seconds later). No fork: the figure measured is the control plane's, not the host's. The
        report is kept until acknowledged and sent again after a reconnect, as the real agent does."""
        now = int(time.time() * 1000)
        report = pb.TaskReport()
        for t in task.atomic_tasks:
            cmd = t.command.split(";", 1)[1].strip() if t.command.startswith("sleep ") and ";" in t.command \
                else t.command
            out = (cmd[5:] + "\n").encode() if cmd.startswith("echo ") else b""
            if out:
                report.outputs.append(pb.TaskOutput(task_id=task.task_id, atomic_task_id=t.atomic_task_id,
                                                    offset=0, data=out))
            report.results.append(pb.TaskItemResult(
                task_id=task.task_id, atomic_task_id=t.atomic_task_id, status=2, error_code=0,
                start_time_ms=now, end_time_ms=now, exit_code=0, has_exit_code=True, output_size=len(out),
                final=True))
            self.unacked[(task.task_id, t.atomic_task_id)] = report
        if self.link is not None:
            self.link.write(pb.AgentFrame(report=report).SerializeToString())
        self.tasks_done += 1
        self.stats.answered += 1

    def answer_proc(self, link, msg) -> None:
        """Answer process operations in-process, as the supervision protocol asks (gse/agent/procs.py): a result
        per (task, process) and the process's new state (what the status cache holds). No fork and no
        post-check wait: the figure measured is the control plane's."""
        now = int(time.time())
        report = pb.ProcReport()
        for op in msg.ops:
            running = op.op_type in (0, 2, 3, 7, 8)
            if op.op_type == 2:
                content = json.dumps({"bk_agent_id": self.id, "utctime": "", "utctime2": "", "timezone": 0,
                                      "process": [{"procname": op.name, "instance": [{
                                          "processName": op.spec.proc_name, "version": "1.0", "isAuto": True,
                                          "cpuUsage": 0.1, "phyMemUsage": 0.2, "pid": 10000 + self.i,
                                          "report_time": now}]}]})
            else:
                content = json.dumps({"value": [{"bk_agent_id": self.id, "procName": op.spec.proc_name,
                                                 "setupPath": op.spec.setup_path, "result": "", "isAuto": running}]})
            report.results.add(task_id=msg.task_id, namespace=op.namespace, name=op.name, error_code=0,
                               content=content)
            report.states.add(namespace=op.namespace, name=op.name, registered=True, status=1 if running else 2,
                              isauto=running, pid=10000 + self.i if running else -1, version="1.0",
                              last_start_time=now, report_time=now, source="api", registered_at=op.registered_at)
        link.write(pb.AgentFrame(proc_report=report).SerializeToString())


def _delay(task) -> float:
    """Seconds to wait before answering: a leading `sleep S;` of the first atomic task."""
    cmd = task.atomic_tasks[0].command if task.atomic_tasks else ""
    if cmd.startswith("sleep ") and ";" in cmd:
        try:
            return max(0.0, float(cmd[6:cmd.index(";")]))
        except ValueError:
            return 0.0
    return 0.0


_SNAP = pb.HostSnapshot(cpu_num=2, mem_size=8 << 30, cpu_rate=3.0, mem_rate=40.0, load1=0.1, uptime_s=3600,
                        proc_count=100, disk_total=100 << 30, disk_used=10 << 30)
HEARTBEAT = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=1, cpu_rate=0.1, mem_rate=0.2, host=_SNAP)).SerializeToString()
LIVENESS = pb.AgentFrame(heartbeat=pb.Heartbeat(seq=2, cpu_rate=0.1, mem_rate=0.2)).SerializeToString()


async def main_async(args) -> None:
    identity = Identity(args.identity, args.certs, args.bundle, args.tokens)
    stats = Stats()
    servers = args.servers.split(",")
    tokens = identity.tokens
    if identity.mode == "enroll" and len(tokens) < args.count:
        raise SystemExit(f"--tokens: {len(tokens)} tokens for {args.count} agents")
    agents = [SimAgent(i, args.tag, servers, identity, stats, args.heartbeat, not args.no_bind,
                       tokens[k] if tokens else "", args.cloud_id, args.server_name)
              for k, i in enumerate(range(args.first, args.first + args.count))]
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
                              "redirects": stats.redirects, "failures": stats.failures,
                              "enrolled": stats.enrolled, "enroll_failures": stats.enroll_failures,
                              "refused": stats.refused, "answered": stats.answered,
                              "duplicates": stats.duplicates, "identities": stats.identities}), flush=True)
            await asyncio.sleep(args.report_s)

    reporter = asyncio.ensure_future(report())
    await stop.wait()
    reporter.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def prepare(c, n: int, workers: int, tag: str, directory: str, mode: str = "issued") -> list[dict]:
    """What each of `workers` simulator processes needs for `n` agents of cluster `c` (a devcluster
    Cluster) under identity `mode`: per-worker --identity/--bundle/--tokens arguments. issued: the
    certificates are made here with the cluster CA (~0.4 ms each); enroll: one-time tokens are made in
    ZooKeeper; shared: the cluster is switched to shared-certificate mode."""
    from gse.common.safefile import write_private
    from gse.common.tls import issue, pem_cert
    per = (n + workers - 1) // workers
    out = []
    if mode == "shared":
        c.zk_put_config("agent_auth", {"shared_certificate": True})
    tokens = c.enroll_tokens(n, ttl_s=24 * 3600) if mode == "enroll" else []
    for w in range(workers):
        first, count = w * per, min(per, n - w * per)
        if count <= 0:
            break
        args = {"identity": mode, "first": first, "count": count}
        if mode == "issued":
            path = os.path.join(directory, f"agents-{w}.jsonl")
            lines = []
            for i in range(first, first + count):
                key, cert = issue(c.ca.key, c.ca.cert, "agent", agent_id=agent_id(tag, i))
                lines.append(json.dumps({"i": i, "cert": pem_cert(cert).decode(), "key": pem_key(key).decode()}))
            write_private(path, ("\n".join(lines) + "\n").encode(), sync=False)
            args["bundle"] = path
        elif mode == "enroll":
            path = os.path.join(directory, f"tokens-{w}.txt")
            write_private(path, ("\n".join(tokens[first:first + count]) + "\n").encode(), sync=False)
            args["tokens"] = path
        out.append(args)
    return out


def spawn_workers(n: int, workers: int, server: str, certs: str, tag: str, log_dir: str,
                  heartbeat: float = 10.0, ramp_rate: float = 0.0, identities: list[dict] | None = None,
                  cloud_id: int = 0, wrap: list[str] | tuple = (), server_name: str = "") -> list:
    """Start `workers` processes holding `n` simulated agents between them (ids and ips from `tag`);
    `ramp_rate`: agents started per second over all workers (0: each worker's default, 1,000/s);
    `identities`: what `prepare` made (default: the shared certificate); `cloud_id`: their area (they dial
    its proxies); `wrap`: a command prefix (e.g. `ip netns exec NS`: then they connect from that namespace's
    address, not from their own 127.x ones); `server_name`: the name checked in the server's certificate."""
    import subprocess
    per = (n + workers - 1) // workers
    procs = []
    for w in range(workers):
        count = min(per, n - w * per)
        if count <= 0:
            break
        ident = identities[w] if identities else {"identity": "shared"}
        extra = ["--identity", ident["identity"]] + (["--bundle", ident["bundle"]] if "bundle" in ident else []) \
            + (["--tokens", ident["tokens"]] if "tokens" in ident else [])
        log = open(os.path.join(log_dir, f"worker-{w}.log"), "w")
        procs.append(subprocess.Popen(
            [*wrap, sys.executable, os.path.abspath(__file__), "--servers", server, "--certs", certs,
             "--count", str(count), "--cloud-id", str(cloud_id), *(["--no-bind"] if wrap else []),
             *(["--server-name", server_name] if server_name else []),
             "--first", str(w * per), "--tag", tag, "--heartbeat", str(heartbeat), "--report-s", "5", *extra,
             *(["--ramp-batch", "10", "--ramp-pause", str(10 * workers / ramp_rate)] if ramp_rate > 0 else [])],
            stdout=log, stderr=subprocess.STDOUT))
    return procs


def start_for(c, n: int, servers: list[str], directory: str, mode: str = "issued", workers: int = 0,
              heartbeat: float = 10.0, ramp_rate: float = 0.0) -> tuple[list[str], list]:
    """`n` simulated agents on cluster `c` with identity `mode`: (their bk_agent_ids, the worker processes)."""
    workers = workers or max(1, (n + 4999) // 5000)
    tag = os.urandom(2).hex()
    idents = prepare(c, n, workers, tag, directory, mode)
    procs = spawn_workers(n, workers, ",".join(servers), str(c.certs_dir), tag, directory, heartbeat, ramp_rate,
                          idents)
    return [agent_id(tag, i) for i in range(n)], procs


API_CHUNK = 5000        # agents per list_agent_state call (the API server's max_hosts_per_call)


def api(c, path: str, body: dict) -> dict:
    """One API call to cluster `c` (gse.devcluster.Cluster) as its app; the decoded envelope (120 s timeout)."""
    from gse.cli import api_call         # the simulator processes never need it
    return api_call(c.api_url(), c.app_code, c.app_secret, path, body, timeout=120)


def alive_count(c, ids: list[str]) -> int:
    """How many of `ids` list_agent_state shows alive (status 2), asked API_CHUNK at a time."""
    n = 0
    for i in range(0, len(ids), API_CHUNK):
        r = api(c, "/api/v2/cluster/list_agent_state", {"agent_id_list": ids[i:i + API_CHUNK]})
        n += sum(1 for d in (r.get("data") or []) if d["status_code"] == 2)
    return n


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
    p.add_argument("--certs", required=True, help="directory with ca.crt (and agent.crt/.key for --identity shared)")
    p.add_argument("--identity", default="shared", choices=("issued", "enroll", "shared"))
    p.add_argument("--bundle", default="", help="--identity issued: JSON lines {i, cert, key}")
    p.add_argument("--tokens", default="", help="--identity enroll: one token per line")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--first", type=int, default=0, help="index of the first agent (ids and ips derive from it)")
    p.add_argument("--tag", default="5e", help="hex prefix of the agent ids")
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--ramp-batch", type=int, default=50)
    p.add_argument("--ramp-pause", type=float, default=0.05)
    p.add_argument("--report-s", type=float, default=1.0)
    p.add_argument("--no-bind", action="store_true", help="connect from 127.0.0.1 instead of per-agent addresses")
    p.add_argument("--cloud-id", type=int, default=0, help="the agents' area (bk_cloud_id); N > 0: --servers are "
                   "that area's proxies")
    p.add_argument("--server-name", default="", help="name checked in the server's certificate (default: the host "
                   "dialled)")
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
