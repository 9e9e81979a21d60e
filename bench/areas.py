"""Cloud areas through proxies (spec section 12): what a proxy costs and saves, in network namespaces.

The servers run in the root namespace on 198.18.0.1; hosts of area 1 are namespaces on a bridge of their own
whose only way out is the area's proxies (gse/devnet.py), each proxy's uplink capped with `tc tbf`. Three
measurements, each against the same thing without a proxy:

  broadcast  N simulated agents (bench/simagents.py: the real link, a certificate each) behind 2 proxies vs
             the same N attached directly: async_execute_script to all N until every result is readable,
             p50 over --rounds (after a warm-up round), and results lost.
  files      one file (--size-mb) from a host beside the servers to --hosts real agents of area 1, uplink and
             every host link at --rate-mbit: bytes through the proxy's uplink over the file size, and the
             last host's time over the physical limit (file size / rate).
  data       --data-agents real agents whose plugins send as fast as they can (bench/data_throughput.py's
             plugins and Redis consumer) for --duration s, direct vs through one proxy (same link cap on both
             paths: the host's link directly, the proxy's uplink through it): records/s at the data server;
             then through the proxy again, SIGKILLed mid-run and restarted: records lost (and duplicates).

    python bench/areas.py broadcast files data          # the defaults: 5,000 agents, 200 MB to 16, 4 agents
    python bench/areas.py broadcast --agents 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from gse.cli import api_call  # noqa: E402
from gse.common.tls import init_certs  # noqa: E402
from gse.devcluster import Cluster, free_port, wait_for  # noqa: E402
from gse.devnet import SERVER_IP, Topology  # noqa: E402

PREFIX = "gsebx"
DEST = "/tmp/gse-bench-areas-dest"
OP = {"operator_name": "bench"}


def uptime() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Bench:
    """One cluster on 198.18.0.1 and one namespace topology; `close()` removes both."""

    def __init__(self, args, uplink_mbit: float | None):
        self.args = args
        self.base = tempfile.mkdtemp(prefix="gse-bench-areas-")
        self.net = Topology(PREFIX)
        self.net.__enter__()
        self.net.add_area(1)
        self.c = Cluster(self.base, log_format="text", heartbeat_interval_s=10.0)
        init_certs(self.c.certs_dir, sans=[SERVER_IP], force=True, shared_agent=True)
        self.uplink = uplink_mbit
        self.proxies: list = []
        self.proxy_nodes: list = []

    def api(self, path: str, body: dict, timeout: float = 300) -> dict:
        return api_call(self.c.api_url(), self.c.app_code, self.c.app_secret, path, body, timeout=timeout)

    def servers(self, files: bool = False, data: bool = False) -> None:
        c = self.c
        c.start_zookeeper()
        c.start_redis()
        if data:
            self.out_redis = c.start_redis()
            c.redis = c.redis[:1]
        c.start_dbproxy(replicas=1)
        self.ts_port = free_port(SERVER_IP)
        c.start_taskserver(host=SERVER_IP, port=self.ts_port, balance={"enabled": False}, data_view_interval_s=1.0)
        if files:
            c.start_fileserver(host=SERVER_IP, announce_interval_s=2)
        if data:
            self.ds = c.start_dataserver(host=SERVER_IP, load_report_interval_s=2.0)
        c.start_apiserver(max_hosts_per_call=max(5000, getattr(self.args, "agents", 0)))

    @property
    def ts(self) -> str:
        return f"{SERVER_IP}:{self.ts_port}"

    def start_proxies(self, n: int, **overrides) -> list[str]:
        for _ in range(n):
            node = self.net.add_proxy(1, uplink_mbit=self.uplink)
            p = self.c.start_proxy(1, host="0.0.0.0", advertise_host=node.down_ip, upstream=[self.ts], netns=node.ns,
                                   register=False, ping={"enabled": False}, wait=False, **overrides)
            self.proxies.append(p)
            self.proxy_nodes.append(node)
        for p in self.proxies:
            self.c.wait_healthy(p, timeout=60)
        return [p.info["address"] for p in self.proxies]

    def agent(self, node, area: int, servers: list[str], private_mount: str = "", **cfg):
        c = self.c
        conf = c.agent_config(len(c.agents) + 1, node.ip, servers=servers, cloud_id=area, bind_ip="",
                              heartbeat_interval_s=5, **cfg)
        conf["tls"]["server_name"] = "gse-server"
        return c.start_agent(ip=node.ip, config=conf, netns=node.ns, private_mount=private_mount, wait=False)

    def close(self) -> None:
        self.c.stop()
        self.net.close()
        if getattr(self.args, "keep_work", False):
            print(f"work directory (logs) kept: {self.base}", flush=True)
        else:
            shutil.rmtree(self.base, ignore_errors=True)


# ---- broadcast ------------------------------------------------------------------------------------------

def run_broadcast(args) -> dict:
    from simagents import agent_id, prepare, spawn_workers, stop_workers
    from swarm import Api, broadcast

    b = Bench(args, args.uplink_mbit)
    out = {}
    try:
        b.servers()
        api = Api(b.c)
        n = args.agents
        workers = max(1, (n + 4999) // 5000)
        for mode in ("direct", "proxies"):
            tag = os.urandom(2).hex()
            ids = [agent_id(tag, i) for i in range(n)]
            idents = prepare(b.c, n, workers, tag, b.base, "issued")
            if mode == "direct":
                node, servers, area = b.net.add_host(0), [b.ts], 0
            else:
                servers, area = b.start_proxies(2), 1
                node = b.net.add_host(1)
            procs = spawn_workers(n, workers, ",".join(servers), str(b.c.certs_dir), tag, b.base, 10.0,
                                  ramp_rate=args.ramp, identities=idents, cloud_id=area,
                                  wrap=["ip", "netns", "exec", node.ns], server_name="gse-server")
            try:
                t0 = time.monotonic()
                wait_for(lambda: api.alive(ids) == n, 600, f"{n} agents alive ({mode})", interval=1.0)
                print(f"{mode}: {n} agents alive in {time.monotonic() - t0:.1f} s (load {uptime()})", flush=True)
                time.sleep(15)
                broadcast(api, ids, 0.05, 180)        # warm-up
                times, lost = [], 0
                for r in range(args.rounds):
                    t, bad = broadcast(api, ids, 0.05, 180)
                    times.append(t)
                    lost += bad
                    print(f"{mode}: broadcast {r + 1}: {t:.2f} s, {bad} missing or failed", flush=True)
                    time.sleep(3)
                out[mode] = {"p50_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
                             "lost": lost, "rounds": len(times)}
            finally:
                stop_workers(procs)
        out["ratio_p50"] = round(out["proxies"]["p50_s"] / out["direct"]["p50_s"], 2)
        print(f"broadcast to {n}: direct p50 {out['direct']['p50_s']} s, through 2 proxies p50 "
              f"{out['proxies']['p50_s']} s ({out['ratio_p50']}x), lost {out['direct']['lost']} / "
              f"{out['proxies']['lost']}", flush=True)
        return {"agents": n, "uplink_mbit": args.uplink_mbit, **out}
    finally:
        b.close()


# ---- files ---------------------------------------------------------------------------------------------

def run_files(args) -> dict:
    size = args.size_mb * 1000 * 1000
    limit = size / (args.rate_mbit * 1e6 / 8)
    b = Bench(args, args.rate_mbit)
    try:
        os.makedirs(DEST, exist_ok=True)
        src_dir = os.path.join(b.base, "src")
        os.makedirs(src_dir)
        src = os.path.join(src_dir, "payload.bin")
        with open(src, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(1000 * 1000))
        b.servers(files=True)
        servers = b.start_proxies(1)
        source = b.agent(b.net.add_host(0), 0, [b.ts], files={"bt_stall_s": 60.0})
        hosts = [b.net.add_host(1, rate_mbit=args.rate_mbit) for _ in range(args.hosts)]
        agents = [b.agent(h, 1, servers, private_mount=DEST, files={"bt_stall_s": 60.0}) for h in hosts]
        ids = [b.c.agent_id_of(a, timeout=30) for a in [source, *agents]]
        wait_for(lambda: (r := b.api("/api/v2/cluster/list_agent_state", {"agent_id_list": ids}))["code"] == 0
                 and sum(d["status_code"] == 2 for d in r["data"]) == len(ids), 120, "agents alive", interval=0.5)
        up = b.proxy_nodes[0].links["up"]
        before = up.counters()[1]
        print(f"files: {args.size_mb} MB to {args.hosts} hosts of area 1, uplink and hosts at {args.rate_mbit} "
              f"Mbit/s (limit {limit:.1f} s), load {uptime()}", flush=True)
        t0 = time.monotonic()
        r = b.api("/api/v2/task/async_transfer_file", {"timeout_seconds": 1800, "auto_mkdir": True, "tasks": [{
            "source": {"file_name": "payload.bin", "store_dir": src_dir, "agent": {"bk_agent_id": ids[0]}},
            "target": {"store_dir": DEST, "agents": [{"bk_agent_id": a} for a in ids[1:]]}}]})
        assert r["code"] == 0, r
        body = {"task_id": r["data"]["result"]["task_id"], "agents": [{"bk_agent_id": a} for a in ids[1:]]}
        finish: dict[str, float] = {}
        types = set()
        while len(finish) < args.hosts:
            res = b.api("/api/v2/task/get_transfer_file_result", body)
            for item in (res.get("data") or {}).get("result", []):
                if item["error_code"] == 0 and item["bk_agent_id"] not in finish:
                    finish[item["bk_agent_id"]] = time.monotonic() - t0
                    types.add(item["content"]["type"])
                elif item["error_code"] not in (0, 115):
                    raise RuntimeError(f"target failed: {item}")
            if time.monotonic() - t0 > 1800:
                raise TimeoutError("transfer did not finish")
            time.sleep(0.2)
        uplink = up.counters()[1] - before
        out = {"hosts": args.hosts, "size_bytes": size, "rate_mbit": args.rate_mbit, "physical_limit_s": round(limit, 2),
               "last_s": round(max(finish.values()), 2), "first_s": round(min(finish.values()), 2),
               "last_vs_limit": round(max(finish.values()) / limit, 2), "uplink_bytes_ratio": round(uplink / size, 3),
               "types": sorted(types)}
        print(f"files: last host {out['last_s']} s ({out['last_vs_limit']}x the limit), first {out['first_s']} s; "
              f"the proxy's uplink carried {out['uplink_bytes_ratio']}x the file (load {uptime()})", flush=True)
        return out
    finally:
        b.close()


# ---- data ----------------------------------------------------------------------------------------------

def data_run(b: Bench, agents: list, duration: float, kill_proxy=None) -> dict:
    """Plugins on every agent send as fast as they can for `duration` s; the consumer counts every record."""
    from data_throughput import consumer_main, plugin_main
    tag = uuid.uuid4().hex[:8]
    target = {"host": "127.0.0.1", "port": b.out_redis.info["port"], "key": f"bench:{tag}"}
    channel = b.api("/api/v2/data/add_route", {"operation": OP, "metadata": {"plat_name": "bench"}, "route": [
        {"stream_to": {"stream_to_id": b.redis_sid, "redis": {"channel_name": target["key"], "data_type": "list"}}}]}
    )["data"]["channel_id"]
    wait_for(lambda: channel in b.c.healthz(b.ds)["channels"], 10, "the route applied")
    ctx = mp.get_context("spawn")
    start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=consumer_main, args=("redis", target, len(agents), stop, out))
    consumer.start()
    plugins = [ctx.Process(target=plugin_main, args=(os.path.join(a.info["run_dir"], "ipc.state.report"), i, channel,
                                                     b.args.record_bytes, duration, 0.0, start, out))
               for i, a in enumerate(agents)]
    for p in plugins:
        p.start()
    for _ in range(len(plugins) + 1):
        assert out.get(timeout=60)[0] == "ready"
    mport = b.ds.info["metrics_port"]
    rec_key = f'gse_dataserver_channel_records_total{{channel="{channel}"}}'

    def records() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
        return next((float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(rec_key)), 0.0)

    start.set()
    warm = min(2.0, duration / 4)
    time.sleep(warm)
    r0, t0 = records(), time.monotonic()
    if kill_proxy is not None:
        time.sleep(max(0.5, duration / 2 - warm))
        kill_proxy()
    time.sleep(max(0.5, duration - (time.monotonic() - t0) - warm - 0.5))
    r1, t1 = records(), time.monotonic()
    sent = {}
    for _ in plugins:
        _k, i, n = out.get(timeout=duration + 120)
        sent[i] = n
    for p in plugins:
        p.join(10)
    stop.set()
    _k, got = out.get(timeout=600)
    consumer.join(10)
    lost = sum(max(0, sent[i] - got["per_agent"][i]) for i in sent)
    return {"records_per_s": round((r1 - r0) / (t1 - t0)), "sent": sum(sent.values()), "received": got["received"],
            "lost": lost, "duplicates": got["duplicates"], "latency_p50_ms": got["p50_ms"]}


def run_data(args) -> dict:
    b = Bench(args, args.data_rate_mbit or None)
    res = {"agents": args.data_agents, "record_bytes": args.record_bytes, "duration_s": args.duration,
           "link_mbit": args.data_rate_mbit}
    try:
        b.servers(data=True)
        rport = b.out_redis.info["port"]
        b.redis_sid = b.api("/api/v2/data/add_streamto", {"operation": OP, "metadata": {"plat_name": "bench"},
                            "stream_to": {"name": "redis-out", "report_mode": "redis", "redis": {
                                "storage_address": [{"ip": "127.0.0.1", "port": rport}]}}})["data"]["stream_to_id"]
        data_cfg = {"batch_delay_ms": 5, "retry_delay_s": 0.3, "reconnect_max_s": 1.0}
        # direct: the agents share one host of area 0 (its link capped like the proxy's uplink below)
        node0 = b.net.add_host(0, rate_mbit=args.data_rate_mbit or None)
        direct = [b.agent(node0, 0, [b.ts], data=data_cfg) for _ in range(args.data_agents)]
        for a in direct:
            b.c.wait_healthy(a, timeout=60)
        time.sleep(3)
        res["direct"] = data_run(b, direct, args.duration)
        print(f"data direct: {res['direct']} (load {uptime()})", flush=True)
        for a in direct:
            a.stop()
        servers = b.start_proxies(1, data={"retry_delay_s": 0.3, "ack_timeout_s": 10.0})
        node1 = b.net.add_host(1)
        behind = [b.agent(node1, 1, servers, data=data_cfg) for _ in range(args.data_agents)]
        for a in behind:
            b.c.wait_healthy(a, timeout=60)
        time.sleep(3)
        res["proxy"] = data_run(b, behind, args.duration)
        print(f"data through a proxy: {res['proxy']} (load {uptime()})", flush=True)
        proxy = b.proxies[0]

        def kill():
            proxy.signal(signal.SIGKILL)
            proxy.popen.wait(10)
            time.sleep(1.0)
            b.proxies[0] = b.c.restart(proxy, wait=False)
            print("data: proxy SIGKILLed and started again", flush=True)
        res["proxy_killed"] = data_run(b, behind, args.duration, kill_proxy=kill)
        print(f"data through a proxy killed mid-run: {res['proxy_killed']} (load {uptime()})", flush=True)
        res["ratio"] = round(res["proxy"]["records_per_s"] / max(1, res["direct"]["records_per_s"]), 2)
        print(f"data: through one proxy {res['ratio']}x the direct throughput; killed mid-run: "
              f"{res['proxy_killed']['lost']} lost, {res['proxy_killed']['duplicates']} duplicates", flush=True)
        return res
    finally:
        b.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", default=["broadcast", "files", "data"], choices=["broadcast", "files", "data"])
    p.add_argument("--agents", type=int, default=5000, help="broadcast: simulated agents")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--ramp", type=float, default=500.0, help="broadcast: agents started per second")
    p.add_argument("--uplink-mbit", type=float, default=100.0, help="broadcast: each proxy's uplink")
    p.add_argument("--hosts", type=int, default=16, help="files: targets of area 1")
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--rate-mbit", type=float, default=100.0, help="files: the uplink and every host link")
    p.add_argument("--data-agents", type=int, default=4)
    p.add_argument("--record-bytes", type=int, default=1024)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--data-rate-mbit", type=float, default=1000.0,
                   help="data: the cap of the link the data crosses (the host's directly, the proxy's uplink "
                        "through it); 0 = none")
    p.add_argument("--keep-work", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, python "
          f"{platform.python_version()}; load before {uptime()}; everything shares these cores", flush=True)
    results = {}
    try:
        for what in dict.fromkeys(args.what):
            results[what] = {"broadcast": run_broadcast, "files": run_files, "data": run_data}[what](args)
    finally:
        Topology.cleanup_stale(PREFIX)
    results["load_after"] = uptime()
    print(json.dumps({"bench": "areas", **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
