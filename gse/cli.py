"""`gse`: the operator's command. `gse certs ...` (gse/certs.py), `gse dev up|down`, `gse run`, `gse push`,
`gse proc`, `gse data top`, `gse package agent`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from gse import certs as certs_cli
from gse.common.errors import ErrorCode, ScriptStatus


def api_call(url: str, app_code: str, app_secret: str, path: str, body: dict, timeout: float = 10.0) -> dict:
    """POST `body` as JSON to `url` + `path` with the X-Bkapi-Authorization header of `app_code`/`app_secret` (spec
    section 1) and return the decoded envelope, also when the HTTP status is an error (401 carries one too). A
    connection failure raises urllib.error.URLError (TimeoutError after `timeout` seconds); a body that is not JSON,
    ValueError."""
    req = urllib.request.Request(
        url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "X-Bkapi-Authorization": json.dumps({"bk_app_code": app_code, "bk_app_secret": app_secret})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"result": False, "code": exc.code, "message": f"HTTP {exc.code}: {body[:200]!r}", "data": None}


def _chmod_digits(text: str) -> str:
    """argparse type of `--mode`: chmod digits (3 or 4 octal digits, e.g. 644), or "" for the source's mode."""
    if text and not (3 <= len(text) <= 4 and all(c in "01234567" for c in text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not chmod digits such as 644")
    return text


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def cmd_dev_up(args) -> int:
    """`gse dev up`: start a whole local cluster in `--dir` (replacing one a detached run left there), wait until
    every agent shows status 2 in list_agent_state, write cluster.json and print the daemons, the agents, an example
    API call and a demo task; then keep it up until Ctrl-C or SIGTERM (or return at once with `--detach`). Exit status
    1, with the logs' tails, when something does not come up."""
    from gse.devcluster import Cluster, ClusterError, stop_from_description, wait_for

    base = Path(args.dir)
    desc = base / "cluster.json"
    if desc.exists():
        stop_from_description(desc)       # a previous detached cluster in the same dir: replace it
        desc.unlink()
    # Each agent enrolls with a one-time token, as a node manager installs one; --agent-identity issued
    # makes their certificates here instead.
    cluster = Cluster(base, log_format="text", heartbeat_interval_s=args.heartbeat,
                      agent_identity=args.agent_identity)
    try:
        print(f"starting a local GSE cluster in {cluster.base} ...", flush=True)
        cluster.up(agents=args.agents, taskservers=args.taskservers, redis_nodes=args.redis, areas=args.areas,
                   area_agents=args.area_agents)
        for p in cluster.agents:
            p.info["bk_agent_id"] = cluster.agent_id_of(p)
        ids = [p.info["bk_agent_id"] for p in cluster.agents]
        url = cluster.api_url()

        def all_alive():
            """list_agent_state's answer once every agent shows status 2 (alive), else None (wait_for polls)."""
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
        if p.kind == "kafka":
            rows.append([p.name, p.pid, cluster.kafka, "-"])
    for p in (cluster.dbproxies + cluster.taskservers + cluster.apiservers + cluster.dataservers + cluster.procmgrs
              + cluster.alarms + cluster.syncdatas + cluster.proxies):
        rows.append([p.name, p.pid, p.info.get("address") or p.info.get("url") or "-",
                     f"127.0.0.1:{p.info['metrics_port']}"])
    print("\n" + _table(rows))
    arows = [["agent", "bk_agent_id", "ip", "area", "pid"]]
    for p in cluster.agents:
        arows.append([p.name, p.info["bk_agent_id"], p.info["ip"], p.info["bk_cloud_id"], p.pid])
    print("\n" + _table(arows))
    body = {"agent_id_list": ids[:2]}
    answer = api_call(url, cluster.app_code, cluster.app_secret, "/api/v2/cluster/list_agent_state", body)
    auth = json.dumps({"bk_app_code": cluster.app_code, "bk_app_secret": cluster.app_secret})
    print(f"\nexample API call:\n  curl -s -X POST {url}/api/v2/cluster/list_agent_state \\\n"
          f"    -H 'X-Bkapi-Authorization: {auth}' \\\n    -d '{json.dumps(body)}'")
    print("its answer:\n  " + json.dumps(answer, indent=2).replace("\n", "\n  "))
    demo_task(url, cluster.app_code, cluster.app_secret, ids)
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


def still_running(res: dict) -> bool:
    """Whether a task or transfer result read says "poll again": the task id is not known yet (top-level
    1000115) or some item still runs (error_code 115; the top-level code is then 0, spec section 4)."""
    if res.get("code") == 1000115:
        return True
    items = (res.get("data") or {}).get("result") or []
    return res.get("code") == 0 and any(i.get("error_code") == 115 for i in items)


def demo_task(url: str, code: str, secret: str, ids: list[str]) -> None:
    """Real work for people to see: one command on every agent through the task API, and its output."""
    command = "echo \"$(id -un)@$(hostname) pid $$: $(uname -sr)\""
    r = api_call(url, code, secret, "/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": i, "user": "root"} for i in ids],
        "atomic_tasks": [{"atomic_task_id": 0, "command": command, "timeout_seconds": 30}]})
    if r.get("code") != 0:
        print(f"\nexample task refused: {r.get('message')}")
        return
    task_id = r["data"]["result"]["task_id"]
    body = {"task_id": task_id, "agent_tasks": [{"bk_agent_id": i, "atomic_tasks": [{"atomic_task_id": 0}]}
                                                for i in ids]}
    deadline = time.monotonic() + 30
    while True:
        res = api_call(url, code, secret, "/api/v2/task/get_execute_script_result", body)
        if not still_running(res) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print(f"\nexample task ({task_id}): `{command}` on every agent:")
    for item in (res.get("data") or {}).get("result", []):
        out = item.get("screen", "").strip() or item.get("error_msg", "")
        print(f"  {item['bk_agent_id'][:12]}  status {item['status']} exit {item['script_exit_code']}  {out}")


def cmd_dev_down(args) -> int:
    """`gse dev down`: stop what a detached `gse dev up` started in `--dir` (from its cluster.json) and remove the
    description; 0 also when there is nothing to stop."""
    from gse.devcluster import stop_from_description

    desc = Path(args.dir) / "cluster.json"
    if not desc.exists():
        print(f"no cluster description at {desc}; nothing to stop")
        return 0
    n = stop_from_description(desc)
    desc.unlink()
    print(f"stopped {n} processes")
    return 0


class Api:
    """Where the CLI finds the API: flags, else the local cluster's cluster.json."""

    def __init__(self, args):
        url, code, secret = args.api_url, args.app_code, args.app_secret
        if not url:
            desc = Path(args.dir) / "cluster.json"
            if not desc.exists():
                raise SystemExit(f"gse: no --api-url given and no cluster description at {desc}")
            d = json.loads(desc.read_text())
            url, code, secret = d["api_url"], code or d["app_code"], secret or d["app_secret"]
        if not code or not secret:
            raise SystemExit("gse: --app-code and --app-secret are required with --api-url")
        self.url, self.code, self.secret = url, code, secret

    def call(self, path: str, body: dict) -> dict:
        """POST one API request (`path` under the API URL, 60 s timeout) and return its envelope."""
        return api_call(self.url, self.code, self.secret, path, body, timeout=60)


def resolve_targets(api: Api, spec: list[str]) -> tuple[list[str], dict[str, str]]:
    """Targets (agent ids, cloud:ip, `all`, globs over ips) -> (agent id list, id -> label)."""
    import fnmatch

    from gse.common.address import parse_host_id

    wanted: list[str] = []
    labels: dict[str, str] = {}
    listing = None
    named: list[str] = []
    for item in (t for s in spec for t in s.split(",") if t):
        if item == "all" or any(ch in item for ch in "*?["):
            if listing is None:
                r = api.call("/api/v2/cluster/list_agents", {})
                if r.get("code") != 0:
                    raise SystemExit(f"gse: cannot list agents: {r.get('message')}")
                listing = r["data"]
            for a in listing:
                host_id = f"{a['bk_cloud_id']}:{a['bk_host_ip']}"
                if item == "all" or fnmatch.fnmatch(a["bk_host_ip"], item) or fnmatch.fnmatch(host_id, item):
                    if a["bk_agent_id"] not in labels:
                        wanted.append(a["bk_agent_id"])
                        labels[a["bk_agent_id"]] = host_label(a["bk_host_ip"], a["bk_cloud_id"])
        elif item not in labels:
            wanted.append(item)
            named.append(item)
            host = parse_host_id(item)
            labels[item] = host_label(host[1], host[0]) if host else item[:12]
    # Hosts named by bk_agent_id: their ip and area from the API (one call per 5,000).
    ids = [i for i in named if not parse_host_id(i)]
    for k in range(0, len(ids), 5000):
        r = api.call("/api/v2/cluster/list_agent_info", {"agent_id_list": ids[k:k + 5000]})
        for a in (r.get("data") or []) if r.get("code") == 0 else []:
            if a.get("bk_agent_id") in labels and a.get("bk_host_ip"):
                labels[a["bk_agent_id"]] = host_label(a["bk_host_ip"], a.get("bk_cloud_id", 0))
    return wanted, labels


def host_label(ip: str, cloud_id: int) -> str:
    """How the CLI names a host in its output: "<area>:<ip>" (its bk_cloud_id and ip, GSE's own host form:
    the same ip in two areas is two hosts, spec section 12)."""
    return f"{cloud_id}:{ip}"


def areas_of(ids: list[str], labels: dict[str, str]) -> str:
    """ "areas 0 (2 hosts), 1 (1 host)" for the hosts among `ids` whose label names their area."""
    from collections import Counter
    counts = Counter(labels[i].split(":", 1)[0] for i in ids if ":" in labels.get(i, ""))
    return ", ".join(f"{a} ({n} host{'s' if n != 1 else ''})" for a, n in sorted(counts.items(), key=lambda kv: int(kv[0])))


def cmd_run(args) -> int:
    """Run one command on many hosts, print output as it arrives, then a summary."""
    api = Api(args)
    command = " ".join(args.command).strip()
    if not command:
        raise SystemExit("gse run: no command given (put it after --)")
    ids, labels = resolve_targets(api, args.targets)
    if not ids:
        print("gse run: no target matched", file=sys.stderr)
        return 2
    r = api.call("/api/v2/task/async_execute_script", {
        "agents": [{"bk_agent_id": i, "user": args.user} for i in ids],
        "atomic_tasks": [{"atomic_task_id": 0, "command": command, "timeout_seconds": args.timeout}]})
    if r.get("code") != 0:
        print(f"gse run: refused: {r.get('message')}", file=sys.stderr)
        return 2
    task_id = r["data"]["result"]["task_id"]
    printed = {i: 0 for i in ids}
    partial = {i: b"" for i in ids}
    done: dict[str, dict] = {}
    width = max(len(v) for v in labels.values())
    while len(done) < len(ids):
        pending = [i for i in ids if i not in done]
        body = {"task_id": task_id, "agent_tasks": [
            {"bk_agent_id": i, "atomic_tasks": [{"atomic_task_id": 0, "offset": printed[i], "limit": 65536}]}
            for i in pending]}
        res = api.call("/api/v2/task/get_execute_script_result", body)
        if res.get("code") not in (0, 1000115):
            print(f"gse run: {res.get('message')}", file=sys.stderr)
            return 2
        for item in (res.get("data") or {}).get("result", []):
            aid = item["bk_agent_id"]
            chunk = item.get("screen", "").encode()
            printed[aid] += len(chunk)
            text = partial[aid] + chunk
            *lines, partial[aid] = text.split(b"\n")
            for line in lines:
                print(f"{labels[aid]:<{width}} | {line.decode('utf-8', 'replace')}", flush=True)
            # A page ends on a character boundary, so it may hold up to 3 bytes less than asked while more follows.
            if item["error_code"] != 115 and len(chunk) < 65536 - 3:
                if partial[aid]:
                    print(f"{labels[aid]:<{width}} | {partial[aid].decode('utf-8', 'replace')}", flush=True)
                done[aid] = item
        if len(done) < len(ids):
            time.sleep(0.2)
    summary = {"ok": [], "failed": [], "timed out": [], "offline": []}
    for aid in ids:
        item = done[aid]
        if item["error_code"] == ErrorCode.OK and item["status"] == ScriptStatus.SUCCESS:
            summary["ok"].append(aid)
        elif item["error_code"] == ErrorCode.AGENT_OFFLINE:
            summary["offline"].append(aid)
        elif item["error_code"] == ErrorCode.TIMEOUT:
            summary["timed out"].append(aid)
        else:
            summary["failed"].append(aid)
            reason = item.get("error_msg") or f"exit {item.get('script_exit_code')}"
            print(f"{labels[aid]:<{width}} ! {reason}", file=sys.stderr)
    print("summary: " + ", ".join(f"{k} {len(v)}" for k, v in summary.items()) + f" (task {task_id})"
          + (f"; areas {areas}" if (areas := areas_of(ids, labels)) else ""))
    return 0 if len(summary["ok"]) == len(ids) else 1


def _split_location(text: str, what: str) -> tuple[str, str]:
    """`WHO:/abs/path` -> (WHO, /abs/path); WHO may itself hold colons (cloud:ip)."""
    i = text.find(":/")
    if i <= 0:
        raise SystemExit(f"gse push: {what} must look like AGENT:/absolute/path, got {text!r}")
    return text[:i], text[i + 1:]


def _bar(progress: int, width: int = 24) -> str:
    filled = int(width * max(0, min(100, progress)) / 100)
    return "[" + "#" * filled + "." * (width - filled) + f"] {progress:3d}%"


def cmd_push(args) -> int:
    """Send a file, a directory or a pattern from one agent to many, with a live progress bar per host."""
    import os
    api = Api(args)
    src_who, src_path = _split_location(args.source, "the source")
    dst_who, dst_dir = _split_location(args.target, "the target")
    src_ids, _ = resolve_targets(api, [src_who])
    if len(src_ids) != 1:
        raise SystemExit(f"gse push: the source must be one agent; {src_who!r} matched {len(src_ids)}")
    ids, labels = resolve_targets(api, [dst_who])
    if not ids:
        print("gse push: no target matched", file=sys.stderr)
        return 2
    store_dir, name = os.path.split(src_path.rstrip("/"))      # name may be a file, a dir, a wildcard, regex:...
    target = {"store_dir": dst_dir, "agents": [{"bk_agent_id": i, "user": args.user} for i in ids]}
    if args.owner:
        target["owner"] = args.owner
    if args.mode:
        target["permission"] = int(args.mode)
    r = api.call("/api/v2/task/async_transfer_file", {
        "timeout_seconds": args.timeout, "auto_mkdir": True, "download_speed": args.speed, "upload_speed": args.speed,
        "tasks": [{"source": {"file_name": name, "store_dir": store_dir or "/",
                              "agent": {"bk_agent_id": src_ids[0], "user": args.user}}, "target": target}]})
    if r.get("code") != 0:
        print(f"gse push: refused: {r.get('message')}", file=sys.stderr)
        return 2
    task_id = r["data"]["result"]["task_id"]
    tty = sys.stdout.isatty()
    width = max(len(labels[i]) for i in ids)
    shown = 0
    body = {"task_id": task_id, "agents": [{"bk_agent_id": i} for i in ids]}
    while True:
        res = api.call("/api/v2/task/get_transfer_file_result", body)
        if res.get("code") not in (0, 1000115):
            print(f"gse push: {res.get('message')}", file=sys.stderr)
            return 2
        per_host: dict[str, list[dict]] = {i: [] for i in ids}
        for item in (res.get("data") or {}).get("result", []):
            per_host.setdefault(item["bk_agent_id"], []).append(item)
        lines = []
        for aid in ids:
            items = per_host.get(aid) or []
            size = sum(i["content"].get("size", 0) for i in items) or 1
            done = sum(i["content"].get("size", 0) * i["content"].get("progress", 0) / 100 for i in items)
            speed = sum(i["content"].get("speed", 0) for i in items)
            failed = [i for i in items if i["error_code"] not in (0, 115)]
            state = "failed: " + failed[0]["error_msg"] if failed else (
                "done" if items and all(i["error_code"] == 0 for i in items) else f"{speed} KB/s")
            lines.append(f"{labels[aid]:<{width}} {_bar(int(100 * done / size))} {state}")
        if tty and shown:
            sys.stdout.write(f"\x1b[{shown}A")
        finished = not still_running(res)
        if tty or finished:
            for line in lines:
                sys.stdout.write(line + ("\x1b[K\n" if tty else "\n"))
            shown = len(lines)
            sys.stdout.flush()
        if finished:
            break
        time.sleep(0.5)
    ok = [a for a in ids if per_host.get(a) and all(i["error_code"] == 0 for i in per_host[a])]
    print(f"summary: ok {len(ok)}, failed {len(ids) - len(ok)} (task {task_id})"
          + (f"; areas {areas}" if (areas := areas_of(ids, labels)) else ""))
    return 0 if len(ok) == len(ids) else 1


PROC_ACTIONS = {"start": 0, "stop": 1, "status": 2, "restart": 7, "reload": 8}
PROC_OK = {0: {0, 828}, 1: {0, 829}}


def cmd_proc(args) -> int:
    """`gse proc TARGETS list|status|start|stop|restart|reload NAME`: one process operation on many hosts
    through the process API (operate_proc_multi, then get_proc_operate_result_v2), each host's result
    printed as it arrives; `list` shows every registered process of the hosts."""
    words = list(args.words)
    if words and words[-1] == "list":
        action, name, spec = "list", "", words[:-1]
    elif len(words) >= 3 and words[-2] in PROC_ACTIONS:
        action, name, spec = words[-2], words[-1], words[:-2]
    else:
        raise SystemExit("gse proc: usage: gse proc TARGETS list | TARGETS start|stop|restart|reload|status NAME")
    api = Api(args)
    ids, labels = resolve_targets(api, spec)
    if not ids:
        print("gse proc: no target matched", file=sys.stderr)
        return 2
    width = max(len(v) for v in labels.values())
    if action == "list":
        r = api.call("/api/v2/proc/list_proc", {"agent_id_list": ids})
        if r.get("code") != 0:
            print(f"gse proc: {r.get('message')}", file=sys.stderr)
            return 2
        rows = [["host", "namespace", "name", "status", "pid", "auto", "version"]]
        state = {0: "unregistered", 1: "running", 2: "stopped"}
        for i in r["data"]["proc_infos"]:
            rows.append([labels.get(i["bk_agent_id"], i["bk_agent_id"]), i["meta"]["namespace"], i["meta"]["name"],
                         state.get(i["status"], "?"), i["pid"] if i["pid"] > 0 else "-", "yes" if i["isauto"] else "no",
                         i["version"] or "-"])
        print(_table(rows))
        return 0
    op = PROC_ACTIONS[action]
    r = api.call("/api/v2/proc/operate_proc_multi", {"proc_operate_req": [
        {"meta": {"namespace": args.namespace, "name": name}, "op_type": op, "agent_id_list": ids}]})
    if r.get("code") != 0:
        print(f"gse proc: refused: {r.get('message')}", file=sys.stderr)
        return 2
    task_id = r["data"]["task_id"]
    done: dict[str, dict] = {}
    deadline = time.monotonic() + args.timeout
    while len(done) < len(ids) and time.monotonic() < deadline:
        res = api.call("/api/v2/proc/get_proc_operate_result_v2", {"task_id": task_id})
        if res.get("code") not in (0, 1000115):
            print(f"gse proc: {res.get('message')}", file=sys.stderr)
            return 2
        for key, item in (res.get("data") or {}).items():
            aid = key[:-len(f":{args.namespace}:{name}")]
            if aid in done or item["error_code"] == ErrorCode.RUNNING:
                continue
            done[aid] = item
            print(f"{labels.get(aid, aid):<{width}} | {_proc_line(op, item)}", flush=True)
        if len(done) < len(ids):
            time.sleep(0.2)
    ok = [a for a, item in done.items() if item["error_code"] in PROC_OK.get(op, {0})]
    print(f"summary: ok {len(ok)}, failed {len(done) - len(ok)}, no answer {len(ids) - len(done)} (task {task_id})")
    return 0 if len(ok) == len(ids) else 1


def _proc_line(op: int, item: dict) -> str:
    code = item["error_code"]
    try:
        content = json.loads(item["content"]) if item["content"] else {}
    except ValueError:
        content = {}
    if op == 2 and code == 0:
        inst = ((content.get("process") or [{}])[0].get("instance") or [{}])[0]
        pid = inst.get("pid", -1)
        return (f"running pid {pid} version {inst.get('version') or '-'} cpu {inst.get('cpuUsage', 0)}% "
                f"mem {inst.get('phyMemUsage', 0)}%" if pid > 0 else "not running")
    text = {0: "ok", 828: "already running", 829: "not running"}.get(code) or item["error_msg"] or "failed"
    out = ((content.get("value") or [{}])[0].get("result") or "").strip()
    return f"{text} ({code})" + (f": {out[-200:]}" if out and code not in (0, 828, 829) else "")


def cmd_data_top(args) -> int:
    """`gse data top`: the data servers' figures per DataID and output (gse/datatop.py), found through `--zookeeper`
    or the local cluster's cluster.json; 0 on Ctrl-C. SystemExit when neither names ZooKeeper."""
    from gse import datatop
    hosts, root = args.zookeeper, args.root
    if not hosts:
        desc = Path(args.dir) / "cluster.json"
        if not desc.exists():
            raise SystemExit(f"gse: no --zookeeper given and no cluster description at {desc}")
        d = json.loads(desc.read_text())
        hosts, root = d["zookeeper"], d["zookeeper_root"]
    try:
        return datatop.run(datatop.dataservers_from_zookeeper(hosts, root), args.interval, args.once, args.json)
    except KeyboardInterrupt:
        return 0


def cmd_package_agent(args) -> int:
    """`gse package agent`: build the agent tarball (gse/package.py) into `--out` and print its path, sha256, size and
    the register_agent_package call that offers it to operate_agent upgrades (spec section 11)."""
    from gse import package
    path, sha = package.build(args.out, args.version or None, args.compress_level)
    size = path.stat().st_size
    print(f"{path}\n  sha256 {sha}\n  size {size} bytes")
    print("to offer it to operate_agent upgrades, put it on a host with an agent and register it:\n"
          "  POST /api/v2/cluster/register_agent_package {\"version_sign\": \"...\", \"version\": ..., "
          f"\"file_name\": \"{path.name}\", \"store_dir\": \"/dir/on/that/host\", \"source_agent\": \"<its id>\", "
          f"\"sha256\": \"{sha}\", \"size\": {size}}}")
    return 0


def _api_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=".gse-dev", help="local cluster dir whose cluster.json names the API")
    p.add_argument("--api-url", default="")
    p.add_argument("--app-code", default="")
    p.add_argument("--app-secret", default="")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `gse`: certs, dev up/down, run, push, proc, data top and package agent, each
    subcommand's handler in `func`."""
    p = argparse.ArgumentParser(prog="gse", description="GSE operator command")
    sub = p.add_subparsers(dest="cmd", required=True)

    certs_cli.add_parser(sub)

    dev = sub.add_parser("dev", help="a local cluster for people").add_subparsers(dest="dev_cmd", required=True)
    up = dev.add_parser("up", help="start ZooKeeper, Redis, the daemons and N agents")
    up.add_argument("--agents", type=int, default=3)
    up.add_argument("--taskservers", type=int, default=2)
    up.add_argument("--redis", type=int, default=2, help="Redis nodes behind dbproxy (replicas = min(2, n))")
    up.add_argument("--heartbeat", type=float, default=10.0, help="agent heartbeat interval, seconds")
    up.add_argument("--areas", type=int, default=1,
                    help="cloud areas 1..N, each with a proxy and its own agents (spec section 12); 0 for none")
    up.add_argument("--area-agents", type=int, default=2, help="agents per cloud area (besides the proxy host's)")
    up.add_argument("--dir", default=".gse-dev")
    up.add_argument("--detach", action="store_true")
    up.add_argument("--agent-identity", choices=("enroll", "issued", "shared"), default="enroll",
                    help="how each agent gets its certificate: enrolled with a one-time token (default), issued "
                         "here for its id, or one shared certificate (the cluster switched to shared mode)")
    up.set_defaults(func=cmd_dev_up)
    down = dev.add_parser("down", help="stop a detached local cluster")
    down.add_argument("--dir", default=".gse-dev")
    down.set_defaults(func=cmd_dev_down)

    run = sub.add_parser("run", help="run a command on many hosts",
                         usage="gse run [--user U] [--timeout S] TARGETS... -- COMMAND...")
    run.add_argument("--user", default="root")
    run.add_argument("--timeout", type=int, default=600, help="seconds; 0 = no limit")
    _api_flags(run)
    run.add_argument("targets", nargs="+", help="agent ids, cloud:ip, 'all', or a glob over ips (comma or space separated)")
    run.set_defaults(func=cmd_run)

    push = sub.add_parser("push", help="send a file, a directory or a pattern from one agent to many",
                          usage="gse push [--owner U] [--mode 644] [--speed MB/s] SRC_AGENT:PATH TARGETS:DIR")
    push.add_argument("source", help="SRC_AGENT:/path (agent id or cloud:ip; the path may be a dir or a pattern)")
    push.add_argument("target", help="TARGETS:/dir (ids, cloud:ip, all or an ip glob, comma separated)")
    push.add_argument("--owner", default="")
    push.add_argument("--mode", default="", type=_chmod_digits,
                      help="chmod digits, e.g. 644 (default: the source's mode)")
    push.add_argument("--speed", type=float, default=0, help="MB/s per host, 0 = unlimited")
    push.add_argument("--user", default="root")
    push.add_argument("--timeout", type=int, default=3600)
    _api_flags(push)
    push.set_defaults(func=cmd_push)

    proc = sub.add_parser("proc", help="process operations on many hosts (start, stop, restart, reload, status)",
                          usage="gse proc [--namespace NS] TARGETS... list | TARGETS... "
                                "start|stop|restart|reload|status NAME")
    proc.add_argument("words", nargs="+", help="targets (ids, cloud:ip, all or an ip glob), then the action and name")
    proc.add_argument("--namespace", default="nodeman", help="the process namespace (default nodeman)")
    proc.add_argument("--timeout", type=float, default=300, help="seconds to wait for every host's result")
    _api_flags(proc)
    proc.set_defaults(func=cmd_proc)

    data = sub.add_parser("data", help="the data path").add_subparsers(dest="data_cmd", required=True)
    top = data.add_parser("top", help="every data server's figures per DataID and output, live")
    top.add_argument("--zookeeper", default="", help="the ZooKeeper ensemble (default: the local cluster's)")
    top.add_argument("--root", default="/gse", help="the ZooKeeper root (with --zookeeper)")
    top.add_argument("--dir", default=".gse-dev", help="local cluster dir whose cluster.json names ZooKeeper")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between two scrapes")
    top.add_argument("--once", action="store_true", help="one round, then exit")
    top.add_argument("--json", action="store_true", help="the figures as one JSON object per round")
    top.set_defaults(func=cmd_data_top)

    pkg = sub.add_parser("package", help="make installable packages").add_subparsers(dest="package_cmd", required=True)
    pa = pkg.add_parser("agent", help="the agent with its runtime and libraries for this platform, as a tarball")
    pa.add_argument("--out", default="dist", help="directory to write it to")
    pa.add_argument("--version", default="", help="stamp this version instead of the source's (release builds)")
    pa.add_argument("--compress-level", type=int, default=6, choices=range(0, 10), metavar="0-9")
    pa.set_defaults(func=cmd_package_agent)
    return p


def main(argv=None) -> int:
    """Entry point of the `gse` console script: what follows `--` is the command of `gse run`; returns the exit status
    of the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = build_parser().parse_args(argv)
    args.command = command
    try:
        return args.func(args)
    except urllib.error.URLError as exc:            # the API server is not there (HTTPError is answered above)
        print(f"gse: cannot reach the API server: {exc.reason}", file=sys.stderr)
    except TimeoutError:
        print("gse: the API server did not answer in time", file=sys.stderr)
    except json.JSONDecodeError as exc:
        print(f"gse: the API server's answer is not JSON ({exc.msg})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
