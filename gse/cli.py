"""`gse`: the operator's command. `gse certs init`, `gse dev up|down`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

from gse.common.tls import init_certs


def api_call(url: str, app_code: str, app_secret: str, path: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(
        url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "X-Bkapi-Authorization": json.dumps({"bk_app_code": app_code, "bk_app_secret": app_secret})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def cmd_certs_init(args) -> int:
    d = init_certs(args.dir, args.san, force=args.force)
    for name in ("ca", "server", "agent", "client"):
        print(f"{d / (name + '.crt')}")
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def cmd_dev_up(args) -> int:
    from gse.devcluster import Cluster, ClusterError, stop_from_description, wait_for

    base = Path(args.dir)
    desc = base / "cluster.json"
    if desc.exists():
        stop_from_description(desc)       # a previous detached cluster in the same dir: replace it
        desc.unlink()
    cluster = Cluster(base, log_format="text", heartbeat_interval_s=args.heartbeat)
    try:
        print(f"starting a local GSE cluster in {cluster.base} ...", flush=True)
        cluster.up(agents=args.agents, taskservers=args.taskservers, redis_nodes=args.redis)
        for p in cluster.agents:
            p.info["bk_agent_id"] = cluster.agent_id_of(p)
        ids = [p.info["bk_agent_id"] for p in cluster.agents]
        url = cluster.api_url()

        def all_alive():
            r = api_call(url, cluster.app_code, cluster.app_secret, "/api/v2/cluster/list_agent_state",
                         {"agent_id_list": ids})
            return r if r.get("code") == 0 and all(a["status_code"] == 2 for a in r["data"]) \
                and len(r["data"]) == len(ids) else None

        wait_for(all_alive, 60, "every agent to show alive in the API", interval=0.2)
        path = cluster.write_description()
    except (ClusterError, OSError, KeyboardInterrupt) as exc:
        print(f"gse dev up failed: {exc}", file=sys.stderr)
        print(cluster.logs(15), file=sys.stderr)
        cluster.stop()
        return 1

    rows = [["daemon", "pid", "address", "metrics"]]
    rows.append(["zookeeper", cluster.procs[0].pid, cluster.zookeeper, "-"])
    for p in cluster.procs:
        if p.kind == "redis":
            rows.append([p.name, p.pid, f"127.0.0.1:{p.info['port']}", "-"])
    for p in cluster.dbproxies + cluster.taskservers + cluster.apiservers:
        rows.append([p.name, p.pid, p.info.get("address") or p.info.get("url"),
                     f"127.0.0.1:{p.info['metrics_port']}"])
    print("\n" + _table(rows))
    arows = [["agent", "bk_agent_id", "ip", "pid"]]
    for p in cluster.agents:
        arows.append([p.name, p.info["bk_agent_id"], p.info["ip"], p.pid])
    print("\n" + _table(arows))
    body = {"agent_id_list": ids[:2]}
    answer = api_call(url, cluster.app_code, cluster.app_secret, "/api/v2/cluster/list_agent_state", body)
    auth = json.dumps({"bk_app_code": cluster.app_code, "bk_app_secret": cluster.app_secret})
    print(f"\nexample API call:\n  curl -s -X POST {url}/api/v2/cluster/list_agent_state \\\n"
          f"    -H 'X-Bkapi-Authorization: {auth}' \\\n    -d '{json.dumps(body)}'")
    print("its answer:\n  " + json.dumps(answer, indent=2).replace("\n", "\n  "))
    print(f"\ncluster description: {path}\nlogs: {cluster.base / 'logs'}")
    if args.detach:
        print("detached; stop it with: gse dev down" + (f" --dir {args.dir}" if args.dir != ".gse-dev" else ""))
        return 0
    print("running; Ctrl-C stops everything", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
            dead = [p.name for p in cluster.procs if not p.alive()]
            if dead:
                print(f"stopped unexpectedly: {', '.join(dead)} (see {cluster.base / 'logs'})", file=sys.stderr)
                break
    except KeyboardInterrupt:
        pass
    print("stopping ...", flush=True)
    cluster.stop()
    desc.unlink(missing_ok=True)
    print("stopped")
    return 0


def cmd_dev_down(args) -> int:
    from gse.devcluster import stop_from_description

    desc = Path(args.dir) / "cluster.json"
    if not desc.exists():
        print(f"no cluster description at {desc}; nothing to stop")
        return 0
    n = stop_from_description(desc)
    desc.unlink()
    print(f"stopped {n} processes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gse", description="GSE operator command")
    sub = p.add_subparsers(dest="cmd", required=True)

    certs = sub.add_parser("certs", help="cluster certificates").add_subparsers(dest="certs_cmd", required=True)
    ci = certs.add_parser("init", help="make the cluster CA and server/agent/client certificates")
    ci.add_argument("--dir", required=True)
    ci.add_argument("--san", action="append", default=[], help="extra subject alternative name for servers")
    ci.add_argument("--force", action="store_true", help="replace existing certificates")
    ci.set_defaults(func=cmd_certs_init)

    dev = sub.add_parser("dev", help="a local cluster for people").add_subparsers(dest="dev_cmd", required=True)
    up = dev.add_parser("up", help="start ZooKeeper, Redis, the daemons and N agents")
    up.add_argument("--agents", type=int, default=3)
    up.add_argument("--taskservers", type=int, default=2)
    up.add_argument("--redis", type=int, default=2, help="Redis nodes behind dbproxy (replicas = min(2, n))")
    up.add_argument("--heartbeat", type=float, default=10.0, help="agent heartbeat interval, seconds")
    up.add_argument("--dir", default=".gse-dev")
    up.add_argument("--detach", action="store_true")
    up.set_defaults(func=cmd_dev_up)
    down = dev.add_parser("down", help="stop a detached local cluster")
    down.add_argument("--dir", default=".gse-dev")
    down.set_defaults(func=cmd_dev_down)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
