"""File distribution benchmark: one 200 MB file from one host to N hosts, BitTorrent vs a naive baseline.

Hosts are network namespaces this script creates (veth pairs on a bridge, addresses in 198.18.0.0/15),
each host's link capped with `tc tbf` in both directions (default 100 Mbit/s), one real agent per
namespace. The servers run in the root namespace on the bridge address. Every agent gets a private tmpfs
at the target directory (its own mount namespace), so that all targets can share one transfer (one
swarm) without writing over each other on this one machine.

  ours      async_transfer_file to all N targets; completion = the last target's result
  baseline  the source sends the whole file to every target itself (one TCP stream per target, all at once)

Reported per N: completion time of the last host, that time divided by the physical limit (file size /
per-host bandwidth), and bytes the source uploaded divided by the file size. Every namespace, veth and
bridge made here is removed at the end, also on failure.

    python bench/file_distribution.py --hosts 4 8 16 --size-mb 200 --rate-mbit 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from gse.cli import api_call  # noqa: E402
from gse.common.tls import init_certs  # noqa: E402
from gse.devcluster import Cluster, free_port, wait_for  # noqa: E402
from gse.devnet import in_namespace, tbf  # noqa: E402

BRIDGE = "gsebr0"
SERVER_IP = "198.18.0.1"
PREFIX = "gsebench"
DEST = "/tmp/gse-bench-dest"


def sh(*args, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def host_ip(i: int) -> str:
    return f"198.18.1.{i + 1}"


class Network:
    """The bridge and the host namespaces; `close()` removes everything made."""

    def __init__(self, rate_mbit: int, mtu: int = 1500):
        self.rate = rate_mbit
        self.mtu = mtu
        self.hosts: list[str] = []
        self.bridge = False

    def __enter__(self):
        self.cleanup_stale()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        self.bridge = True
        sh("ip", "addr", "add", f"{SERVER_IP}/16", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "mtu", str(self.mtu))
        sh("ip", "link", "set", BRIDGE, "up")
        return self

    @staticmethod
    def cleanup_stale() -> None:
        out = sh("ip", "netns", "list", check=False).stdout
        for line in out.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(PREFIX):
                sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", BRIDGE, check=False)

    def add_host(self, i: int) -> str:
        ns, outer = f"{PREFIX}{i}", f"gbv{i}"
        sh("ip", "netns", "add", ns)
        self.hosts.append(ns)
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", outer, "master", BRIDGE)
        sh("ip", "link", "set", outer, "mtu", str(self.mtu))
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "mtu", str(self.mtu))
        sh("ip", "link", "set", outer, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{host_ip(i)}/16", "dev", "eth0")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", *tbf(self.rate))   # host's upload
        sh("tc", "qdisc", "add", "dev", outer, "root", *tbf(self.rate))                                 # host's download
        return ns

    @staticmethod
    def tx_bytes(ns: str) -> int:
        out = sh("ip", "netns", "exec", ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes").stdout
        return int(out.strip())

    def close(self) -> None:
        for ns in self.hosts:
            sh("ip", "netns", "del", ns, check=False)
        for i in range(len(self.hosts)):
            sh("ip", "link", "del", f"gbv{i}", check=False)
        if self.bridge:
            sh("ip", "link", "del", BRIDGE, check=False)

    def __exit__(self, *exc):
        self.close()


class LinkSampler:
    """Samples every host link's bytes each `interval` s (from the bridge side: rx = what the host uploaded, tx =
    what it downloaded) and the machine's CPU idle share, in a thread, until stopped."""

    def __init__(self, hosts: int, interval: float = 1.0):
        self.hosts = hosts
        self.interval = interval
        self.samples: list[tuple[float, list[int], list[int], float]] = []   # (t, up[], down[], cpu idle 0-1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = 0.0

    @staticmethod
    def _read(path: str) -> int:
        with open(path) as f:
            return int(f.read())

    @staticmethod
    def _cpu() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    def _snap(self) -> tuple[list[int], list[int], tuple[int, int]]:
        up = [self._read(f"/sys/class/net/gbv{i}/statistics/rx_bytes") for i in range(self.hosts)]
        down = [self._read(f"/sys/class/net/gbv{i}/statistics/tx_bytes") for i in range(self.hosts)]
        return up, down, self._cpu()

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def _run(self) -> None:
        prev = self._snap()
        nxt = time.monotonic()
        while not self._stop.is_set():
            nxt += self.interval
            self._stop.wait(max(0.0, nxt - time.monotonic()))
            cur = self._snap()
            idle, total = cur[2][0] - prev[2][0], cur[2][1] - prev[2][1]
            self.samples.append((round(time.monotonic() - self.t0, 2),
                                 [a - b for a, b in zip(cur[0], prev[0])], [a - b for a, b in zip(cur[1], prev[1])],
                                 idle / total if total else 0.0))
            prev = cur

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self, rate_bytes: float) -> list[dict]:
        """Per sample: the source's upload, the targets' mean/min/max upload and download (shares of the link)."""
        rows = []
        for t, up, down, idle in self.samples:
            cap = rate_bytes * self.interval
            tu, td = up[1:], down[1:]
            rows.append({"t": t, "src_up": round(up[0] / cap, 2), "tgt_up_mean": round(sum(tu) / len(tu) / cap, 2),
                         "tgt_down_mean": round(sum(td) / len(td) / cap, 2), "tgt_down_min": round(min(td) / cap, 2),
                         "tgt_down_max": round(max(td) / cap, 2), "cpu_idle": round(idle, 2)})
        return rows


def in_host(ns: str, cmd: list[str], private_dest: bool = False) -> list[str]:
    """The command line that runs `cmd` in host namespace `ns` (with a private tmpfs at DEST)."""
    return in_namespace(ns, cmd, DEST if private_dest else "")


def run_ours(n: int, size: int, src_path: str, rate: int, work: str, mtu: int = 1500,
             timeline: bool = False) -> dict:
    with Network(rate, mtu) as net:
        # A fresh directory per run: agents of a repeated N must not find the previous run's state.
        c = Cluster(tempfile.mkdtemp(prefix=f"ours-{n}-", dir=work), heartbeat_interval_s=5)
        init_certs(c.certs_dir, sans=[SERVER_IP], force=True, shared_agent=True)
        try:
            c.start_zookeeper()
            c.start_redis()
            c.start_dbproxy(replicas=1)
            ts_port = free_port(SERVER_IP)
            c.start_taskserver(host=SERVER_IP, port=ts_port)
            c.start_fileserver(host=SERVER_IP, announce_interval_s=2)
            c.start_apiserver()
            for i in range(n + 1):
                net.add_host(i)
            agents = []
            for i in range(n + 1):
                ns = net.hosts[i]
                cfg = c.agent_config(i, host_ip(i), servers=[f"{SERVER_IP}:{ts_port}"], bind_ip="",
                                     heartbeat_interval_s=5)
                cfg["tls"]["server_name"] = "gse-server"
                cfg["files"] = {"bt_stall_s": 60.0}
                path = c.base / "conf" / f"agent-{i}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                cmd = in_host(ns, [sys.executable, "-m", "gse.agent", "--config", str(path)], private_dest=i > 0)
                proc = c._spawn(f"agent-{i}", "agent", cmd, {"metrics_port": cfg["metrics"]["port"], "ip": host_ip(i),
                                                            "data_dir": cfg["data_dir"], "run_dir": cfg["run_dir"],
                                                            "bk_cloud_id": 0})
                c.agents.append(proc)
                agents.append(proc)
            ids = [c.agent_id_of(p, timeout=30) for p in agents]
            url = c.api_url()

            def call(path, body):
                return api_call(url, c.app_code, c.app_secret, path, body, timeout=60)

            wait_for(lambda: (r := call("/api/v2/cluster/list_agent_state", {"agent_id_list": ids}))["code"] == 0
                     and sum(d["status_code"] == 2 for d in r["data"]) == len(ids), 60, "agents alive", interval=0.5)
            before = net.tx_bytes(net.hosts[0])
            sampler = LinkSampler(n + 1)
            t0 = time.monotonic()
            sampler.start(t0)
            r = call("/api/v2/task/async_transfer_file", {"timeout_seconds": 1800, "auto_mkdir": True, "tasks": [{
                "source": {"file_name": os.path.basename(src_path), "store_dir": os.path.dirname(src_path),
                           "agent": {"bk_agent_id": ids[0]}},
                "target": {"store_dir": DEST, "agents": [{"bk_agent_id": a} for a in ids[1:]]}}]})
            assert r["code"] == 0, r
            task_id = r["data"]["result"]["task_id"]
            body = {"task_id": task_id, "agents": [{"bk_agent_id": a} for a in ids[1:]]}
            finish: dict[str, float] = {}
            while len(finish) < n:
                res = call("/api/v2/task/get_transfer_file_result", body)
                for item in res["data"]["result"]:
                    aid = item["bk_agent_id"]
                    if item["error_code"] == 0 and aid not in finish:
                        finish[aid] = time.monotonic() - t0
                    elif item["error_code"] not in (0, 115):
                        raise RuntimeError(f"target failed: {item}")
                if time.monotonic() - t0 > 1800:
                    raise TimeoutError("transfer did not finish")
                time.sleep(0.2)
            uploaded = net.tx_bytes(net.hosts[0]) - before
            sampler.stop()
            types = sorted({i["content"]["type"] for i in res["data"]["result"]})
            out = {"last_s": round(max(finish.values()), 2), "first_s": round(min(finish.values()), 2),
                   "source_upload_ratio": round(uploaded / size, 2), "types": types}
            if timeline:
                out["timeline"] = sampler.summary(rate * 1e6 / 8)
            return out
        finally:
            c.stop()


BASELINE_SERVER = r"""
import socket, sys, threading
path, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, port)); s.listen(64)
print("ready", flush=True)
def serve(c):
    with open(path, "rb") as f:
        c.sendfile(f)
    c.close()
ts = []
for _ in range(n):
    c, _a = s.accept()
    t = threading.Thread(target=serve, args=(c,)); t.start(); ts.append(t)
for t in ts: t.join()
"""

BASELINE_CLIENT = r"""
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port)); got = 0
while got < size:
    d = c.recv(1 << 20)
    if not d: break
    got += len(d)
print(got, flush=True)
"""


def run_baseline(n: int, size: int, src_path: str, rate: int, mtu: int = 1500) -> dict:
    with Network(rate, mtu) as net:
        for i in range(n + 1):
            net.add_host(i)
        port = 7000
        server = subprocess.Popen(in_host(net.hosts[0], [sys.executable, "-c", BASELINE_SERVER, src_path,
                                                          host_ip(0), str(port), str(n)]),
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            before = net.tx_bytes(net.hosts[0])
            t0 = time.monotonic()
            clients = [subprocess.Popen(in_host(net.hosts[i], [sys.executable, "-c", BASELINE_CLIENT, host_ip(0),
                                                                str(port), str(size)]),
                                        stdout=subprocess.PIPE, text=True) for i in range(1, n + 1)]
            done = []
            for cl in clients:
                got = int(cl.communicate(timeout=3600)[0].strip())
                assert got == size, got
                done.append(time.monotonic() - t0)
            uploaded = net.tx_bytes(net.hosts[0]) - before
            return {"last_s": round(max(done), 2), "source_upload_ratio": round(uploaded / size, 2)}
        finally:
            server.kill()


def main() -> int:
    p = argparse.ArgumentParser(description="file distribution: BitTorrent vs naive unicast, in namespaces")
    p.add_argument("--hosts", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--rate-mbit", type=int, default=100)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--timeline", action="store_true", help="also sample every host link once a second and print "
                   "the source's and the targets' upload and download as shares of the link, and the CPU idle share")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (daemon and agent logs)")
    p.add_argument("--mtu", type=int, default=1500, help="MTU of the simulated links (9000: jumbo frames, "
                   "less per-packet kernel work on this one machine)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    os.makedirs(DEST, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gse-filebench-")
    size = args.size_mb * 1000 * 1000
    src = os.path.join(work, "src", "payload.bin")
    os.makedirs(os.path.dirname(src))
    with open(src, "wb") as f:
        for _ in range(args.size_mb):
            f.write(os.urandom(1000 * 1000))
    limit = size / (args.rate_mbit * 1e6 / 8)
    print(f"file {size / 1e6:.0f} MB, every host link {args.rate_mbit} Mbit/s up and down, MTU {args.mtu} -> "
          f"physical limit "
          f"{limit:.1f} s; {os.cpu_count()} cores shared by every agent, server and the kernel's forwarding",
          flush=True)
    results = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        for n in args.hosts:
            ours = run_ours(n, size, src, args.rate_mbit, work, args.mtu, args.timeline)
            for r in ours.get("timeline", []):
                print("  " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)
            row = {"hosts": n, "ours_last_s": ours["last_s"], "ours_vs_limit": round(ours["last_s"] / limit, 2),
                   "ours_source_upload_ratio": ours["source_upload_ratio"], "ours_types": ours["types"],
                   "ours_first_s": ours["first_s"]}
            if "timeline" in ours:
                row["ours_timeline"] = ours["timeline"]
            if not args.skip_baseline:
                base = run_baseline(n, size, src, args.rate_mbit, args.mtu)
                row.update(baseline_last_s=base["last_s"], baseline_vs_limit=round(base["last_s"] / limit, 2),
                           baseline_source_upload_ratio=base["source_upload_ratio"])
            results.append(row)
            print(f"N={n:>2}: ours last host {row['ours_last_s']} s ({row['ours_vs_limit']}x the limit), source "
                  f"uploaded {row['ours_source_upload_ratio']}x the file"
                  + (f"; baseline {row['baseline_last_s']} s ({row['baseline_vs_limit']}x), source uploaded "
                     f"{row['baseline_source_upload_ratio']}x" if not args.skip_baseline else ""), flush=True)
    finally:
        Network.cleanup_stale()
        if args.keep_work:
            print(f"work directory (logs) kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "file_distribution", "size_bytes": size, "rate_mbit": args.rate_mbit, "mtu": args.mtu,
                      "physical_limit_s": round(limit, 2), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
