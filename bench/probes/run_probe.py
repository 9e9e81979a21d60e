"""Driver: one experiment = a probe server, N agent streams from P client processes, then measurements.

Measures, for the server process only:
  rss_idle_mb, rss_mb           RSS before any client and with N streams held (after a settle time)
  rss_kb_per_stream             (rss - rss_idle) / N, i.e. the growth per stream (x1000 = KB per 1k... MB/1k)
  anon_kb_per_stream            the same from smaps_rollup Anonymous (heap, arenas), excluding file pages
  py_kb_per_stream              Python-allocator share (tracemalloc; only with --tracemalloc)
  attach_s                      first client start until N sessions are held (N handlers started with --no-hello)
  cpu_pct, us_per_hb            server CPU over --window seconds of steady heartbeats, and per heartbeat
  bcast                         per round: time to hand one frame to every stream, time until all reports came back

    python bench/probes/run_probe.py --label base --n 2000 --procs 2 -- --handler queue
    (arguments after -- go to stream_server.py; --client-arg passes one to every stream_clients.py)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


def ctl(port: int, cmd: str, timeout: float = 300) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((cmd + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def anon_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    return 0


def run(args, server_args: list[str]) -> dict:
    env = dict(os.environ)
    if args.arena:
        env["MALLOC_ARENA_MAX"] = str(args.arena)
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    port = args.port
    srv = subprocess.Popen([PY, os.path.join(HERE, "stream_server.py"), "--port", str(port), "--control-port",
                            str(port + 1), "--hb-interval", str(args.hb), *server_args],
                           stdout=subprocess.PIPE, stderr=open(f"/tmp/probe-server-{port}.log", "w"), env=env, text=True)
    clients = []
    out = {"label": args.label, "n": args.n, "procs": args.procs, "hb_s": args.hb, "server_args": server_args,
           "client_args": args.client_arg, "arena": args.arena}
    try:
        ready = json.loads(srv.stdout.readline())
        sp = psutil.Process(ready["pid"])
        time.sleep(2)
        st0 = ctl(port + 1, "stats")
        anon0 = anon_kb(sp.pid)
        out["rss_idle_mb"] = round(st0["rss"] / 2**20, 1)
        per = args.n // args.procs
        t0 = time.monotonic()
        cpu0 = sum(sp.cpu_times()[:2])
        for p in range(args.procs):
            cargs = [PY, os.path.join(HERE, "stream_clients.py"), "--target", f"127.0.0.1:{port}",
                     "--count", str(per), "--first", str(p * per), *args.client_arg]
            if "--plain" in server_args:
                cargs.append("--plain")
            clients.append(subprocess.Popen(cargs, stdout=open(f"/tmp/probe-client-{port}-{p}.log", "w"),
                                            stderr=subprocess.STDOUT, env=dict(os.environ)))
        key = "started" if "--no-hello" in args.client_arg else "sessions"
        trace = []
        last, last_change = -1, time.monotonic()
        while True:
            st = ctl(port + 1, "stats")
            el = time.monotonic() - t0
            trace.append((round(el, 1), st["started"], st["sessions"]))
            if st[key] != last:
                last, last_change = st[key], time.monotonic()
            if st[key] >= per * args.procs or el > args.attach_timeout \
                    or time.monotonic() - last_change > args.stall_s:
                break
            time.sleep(1)
        out["attach_s"] = round(el, 1)
        out["attach_cpu_s"] = round(sum(sp.cpu_times()[:2]) - cpu0, 1)
        out["started"], out["sessions"] = st["started"], st["sessions"]
        if "--no-hello" in args.client_arg:
            out["trace"] = trace[::max(1, len(trace) // 12)] + trace[-1:]
        time.sleep(args.settle)
        st1 = ctl(port + 1, "stats")
        held = max(1, st1["sessions"] if key == "sessions" else st1["started"])
        out.update(rss_mb=round(st1["rss"] / 2**20, 1), threads=st1["threads"], fds=st1["fds"], held=held,
                   rss_kb_per_stream=round((st1["rss"] - st0["rss"]) / 1024 / held, 1),
                   anon_kb_per_stream=round((anon_kb(sp.pid) - anon0) / held, 1))
        if "py_traced" in st1:
            out["py_kb_per_stream"] = round((st1["py_traced"] - st0["py_traced"]) / 1024 / held, 1)
        if args.trim:
            tr = ctl(port + 1, "trim")
            out["rss_after_trim_mb"] = round(tr["rss_after"] / 2**20, 1)
            out["trim_kb_per_stream_after"] = round((tr["rss_after"] - st0["rss"]) / 1024 / held, 1)
        if args.window:
            c0, w0 = sum(sp.cpu_times()[:2]), time.monotonic()
            time.sleep(args.window)
            c1, w1 = sum(sp.cpu_times()[:2]), time.monotonic()
            cpu = c1 - c0
            out["cpu_pct"] = round(100 * cpu / (w1 - w0), 1)
            if "--no-heartbeat" not in args.client_arg and key == "sessions":
                hbs = held / args.hb * (w1 - w0)
                out["us_per_hb"] = round(1e6 * cpu / hbs, 1)
        if args.bcast:
            out["bcast"] = ctl(port + 1, f"bcast {args.bcast}")["rounds"]
            if "rw" in server_args:
                out["bcast_direct"] = ctl(port + 1, f"bcast {args.bcast} direct")["rounds"]
            st2 = ctl(port + 1, "stats")
            out["rss_after_bcast_mb"] = round(st2["rss"] / 2**20, 1)
        if args.top:
            out["top"] = ctl(port + 1, "top")["top"]
        errs = []
        for p in range(args.procs):
            with open(f"/tmp/probe-client-{port}-{p}.log") as f:
                lines = [ln for ln in f.read().splitlines() if ln.startswith("{")]
            if lines:
                errs.append(json.loads(lines[-1]))
        out["client_last"] = errs
    finally:
        for c in clients:
            c.send_signal(signal.SIGTERM)
        for c in clients:
            try:
                c.wait(15)
            except subprocess.TimeoutExpired:
                c.kill()
        srv.kill()
        srv.wait()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--port", type=int, default=50100)
    p.add_argument("--hb", type=float, default=10.0, help="heartbeat interval (s) the server names")
    p.add_argument("--settle", type=float, default=12.0)
    p.add_argument("--window", type=float, default=20.0, help="CPU measurement window (s); 0 = none")
    p.add_argument("--bcast", type=int, default=0, help="broadcast rounds after the CPU window")
    p.add_argument("--arena", type=int, default=0, help="MALLOC_ARENA_MAX for the server (0 = unset)")
    p.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the server")
    p.add_argument("--client-arg", action="append", default=[], help="argument for every stream_clients.py")
    p.add_argument("--attach-timeout", type=float, default=180)
    p.add_argument("--stall-s", type=float, default=20, help="stop waiting for attach after no progress this long")
    p.add_argument("--trim", action="store_true", help="call malloc_trim(0) in the server after settling")
    p.add_argument("--top", action="store_true", help="tracemalloc top allocations (server needs --tracemalloc)")
    a, rest = p.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    print(json.dumps(run(a, rest)), flush=True)
