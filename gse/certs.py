"""`gse certs`: the cluster CA and the certificates of every role (gse/common/tls.py, gse/common/roles.py),
enrollment tokens (gse/common/enrollment.py), revocation and the shared-certificate switch.

    gse certs init    --dir DIR [--san NAME]... [--shared-agent] [--force]
    gse certs issue   --dir DIR --role ROLE --name NAME [--agent-id ID] [--area N] [--san NAME]... [--days N]
    gse certs token   [--count N | --agent-id ID...] [--ttl S] [--note TEXT] [--out FILE]
    gse certs revoke  ID... [--serial HEX]... [--reason TEXT] [--lift]
    gse certs revoked
    gse certs shared-mode on|off|status

The last four act on the cluster through ZooKeeper: `--zookeeper HOSTS --root /gse`, or a local cluster's
`cluster.json` (`--dev-dir`, default .gse-dev).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from gse.common import roles
from gse.common.safefile import write_private
from gse.common.tls import CA, CertError, init_certs


def cmd_init(args) -> int:
    """`gse certs init`: make the cluster CA and the server, api and operator pairs (and the shared agent pair) in
    `--dir`, keeping what exists unless `--force`; prints the certificate paths. Exit code 0."""
    d = init_certs(args.dir, args.san, force=args.force, shared_agent=args.shared_agent)
    names = ["ca", "server", "api", "operator"] + (["agent"] if args.shared_agent else [])
    for name in names:
        print(d / f"{name}.crt")
    return 0


def cmd_issue(args) -> int:
    """`gse certs issue`: one more key and certificate of `--role` from the CA in `--dir`, written to `--out` (default
    `--dir`) as `<name>.crt`/`<name>.key`; prints the certificate path. Exits with a message (SystemExit) when the
    pair exists without `--force`, the CA cannot be loaded, or the role or agent id is refused."""
    d = Path(args.dir)
    out = Path(args.out or args.dir)
    name = args.name or (args.agent_id if args.agent_id else args.role)
    if not args.force and (out / f"{name}.crt").exists():
        raise SystemExit(f"gse certs issue: {out / (name + '.crt')} exists (--force replaces it)")
    try:
        ca = CA.load(d / "ca.crt", d / "ca.key")
        out.mkdir(parents=True, exist_ok=True)
        path = ca.issue_files(out, name, args.role, agent_id=args.agent_id, sans=args.san, days=args.days,
                              area=args.area)
    except CertError as exc:
        raise SystemExit(f"gse certs issue: {exc}") from None
    print(path)
    return 0


# ---- through ZooKeeper -----------------------------------------------------------------------------------

def _zk(args):
    """A started kazoo client and the cluster's ZooKeeper root, from the flags or a local cluster.json."""
    from kazoo.client import KazooClient
    hosts, root = args.zookeeper, args.root
    if not hosts:
        desc = Path(args.dev_dir) / "cluster.json"
        if not desc.exists():
            raise SystemExit(f"gse certs {args.certs_cmd}: --zookeeper is required (no local cluster at {desc})")
        d = json.loads(desc.read_text())
        hosts, root = d["zookeeper"], root or d["zookeeper_root"]
    zk = KazooClient(hosts=hosts, timeout=10)
    try:
        zk.start(timeout=15)
    except Exception as exc:  # noqa: BLE001 - kazoo's timeout type varies
        raise SystemExit(f"gse certs {args.certs_cmd}: cannot reach ZooKeeper at {hosts}: {exc}") from None
    return zk, (root or "/gse").rstrip("/")


def _update_config(zk, root: str, name: str, change) -> dict:
    """Read-modify-write `<root>/config/<name>` (JSON) with a version check, retried when raced."""
    from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError
    path = f"{root}/config/{name}"
    while True:
        try:
            data, stat = zk.get(path)
            doc, version = (json.loads(data) if data else {}), stat.version
        except NoNodeError:
            doc, version = {}, None
        new = change(doc if isinstance(doc, dict) else {})
        raw = json.dumps(new, sort_keys=True).encode()
        try:
            if version is None:
                zk.create(path, raw, makepath=True)
            else:
                zk.set(path, raw, version=version)
            return new
        except (BadVersionError, NodeExistsError):
            continue


def cmd_token(args) -> int:
    """`gse certs token`: prune expired tokens, then make `--count` unbound tokens or one per `--agent-id`, valid
    `--ttl` seconds; prints them (as "<agent id> <token>" lines when bound) or writes them to `--out` with mode 0600.
    Exits with a message when an agent id is invalid or ZooKeeper cannot be reached."""
    from gse.common.enrollment import make_tokens, prune_tokens
    zk, root = _zk(args)
    try:
        pruned = prune_tokens(zk, root)
        tokens = make_tokens(zk, root, args.count, args.ttl, args.agent_id or None, args.note)
    except ValueError as exc:
        raise SystemExit(f"gse certs token: {exc}") from None
    finally:
        zk.stop()
        zk.close()
    lines = [f"{a} {t}" for a, t in zip(args.agent_id, tokens)] if args.agent_id else tokens
    if args.out:
        write_private(args.out, ("\n".join(lines) + "\n").encode())
        print(f"{len(tokens)} token(s) written to {args.out} (mode 0600), valid {args.ttl:.0f} s"
              + (f"; {pruned} expired token(s) removed" if pruned else ""))
    else:
        print("\n".join(lines))
    return 0


def cmd_revoke(args) -> int:
    """`gse certs revoke`: add the named agent ids and certificate serials to `<root>/config/revoked` (or take them off
    with `--lift`), each entry stamped with the time (ms), reason and operator; task servers apply it live."""
    if not args.agent_id and not args.serial:
        raise SystemExit("gse certs revoke: name at least one bk_agent_id or --serial")
    zk, root = _zk(args)
    now = int(time.time() * 1000)
    entry = {"at": now, "reason": args.reason, "by": os.environ.get("USER", "")}

    def _as_dict(value) -> dict:       # the document also reads as lists of ids
        return dict(value) if isinstance(value, dict) else {k: {} for k in value or ()}

    def _change(doc: dict) -> dict:
        listed = {"agents": _as_dict(doc.get("agents")), "serials": _as_dict(doc.get("serials"))}
        names = [("agents", a) for a in args.agent_id] + \
            [("serials", sn.upper().replace(":", "")) for sn in args.serial]
        for kind, name in names:
            if args.lift:
                listed[kind].pop(name, None)
            else:
                listed[kind][name] = entry
        return listed

    try:
        doc = _update_config(zk, root, "revoked", _change)
    finally:
        zk.stop()
        zk.close()
    verb = "lifted" if args.lift else "revoked"
    print(f"{verb}: {' '.join([*args.agent_id, *args.serial])}; the list now names {len(doc['agents'])} "
          f"agent(s) and {len(doc['serials'])} certificate(s); task servers apply it within seconds")
    return 0


def cmd_revoked(args) -> int:
    """`gse certs revoked`: print the revocation list as JSON (empty lists when there is none)."""
    zk, root = _zk(args)
    try:
        data, _ = zk.get(f"{root}/config/revoked") if zk.exists(f"{root}/config/revoked") else (b"", None)
    finally:
        zk.stop()
        zk.close()
    print(json.dumps(json.loads(data) if data else {"agents": {}, "serials": {}}, indent=2, sort_keys=True))
    return 0


def cmd_shared_mode(args) -> int:
    """`gse certs shared-mode on|off|status`: set or show `shared_certificate` in `<root>/config/agent_auth`, the switch
    that lets one certificate naming no agent attach as any agent."""
    zk, root = _zk(args)
    try:
        if args.state == "status":
            path = f"{root}/config/agent_auth"
            data = zk.get(path)[0] if zk.exists(path) else b""
            doc = json.loads(data) if data else {}
        else:
            doc = _update_config(zk, root, "agent_auth",
                                 lambda d: {**d, "shared_certificate": args.state == "on"})
    finally:
        zk.stop()
        zk.close()
    on = doc.get("shared_certificate") is True
    print(f"shared-certificate mode is {'on' if on else 'off'}"
          + (" (a certificate naming no agent is taken for any bk_agent_id; takeovers from another address are "
             "refused)" if on else " (every agent needs a certificate of its own)"))
    return 0


def _zk_flags(p) -> None:
    p.add_argument("--zookeeper", default=os.environ.get("GSE_ZOOKEEPER", ""),
                   help="ZooKeeper hosts (default $GSE_ZOOKEEPER, else the local cluster's)")
    p.add_argument("--root", default="", help="the cluster's ZooKeeper root (default /gse)")
    p.add_argument("--dev-dir", default=".gse-dev", help="local cluster dir whose cluster.json names ZooKeeper")


def add_parser(sub) -> None:
    """Register `gse certs ...` on the `gse` command's subparsers."""
    certs = sub.add_parser("certs", help="cluster certificates, enrollment tokens, revocation").add_subparsers(
        dest="certs_cmd", required=True)
    ci = certs.add_parser("init", help="make the cluster CA and the server, api and operator certificates")
    ci.add_argument("--dir", required=True)
    ci.add_argument("--san", action="append", default=[], help="extra subject alternative name for servers")
    ci.add_argument("--shared-agent", action="store_true",
                    help="also make agent.crt/agent.key, one certificate for every host (the cluster must "
                         "switch shared-certificate mode on to accept it; per-agent enrollment is the default)")
    ci.add_argument("--force", action="store_true", help="make a new CA and replace every certificate")
    ci.set_defaults(func=cmd_init)

    iss = certs.add_parser("issue", help="make one more certificate from the cluster CA",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="roles: server (every server daemon), api (the API server), agent, "
                                       "proxy, operator (operator tools)")
    iss.add_argument("--dir", required=True, help="the directory holding ca.crt and ca.key")
    iss.add_argument("--role", required=True, choices=roles.ROLES)
    iss.add_argument("--name", default="", help="file name without .crt/.key (default: the agent id or role)")
    iss.add_argument("--agent-id", default="", help="agent/proxy certificates: the bk_agent_id it is made for")
    iss.add_argument("--san", action="append", default=[], help="server/proxy: extra subject alternative name")
    iss.add_argument("--area", type=int, default=None,
                     help="proxy certificates (required for them): the cloud area (bk_cloud_id) the proxy serves")
    iss.add_argument("--days", type=int, default=825)
    iss.add_argument("--out", default="", help="write the pair here instead of --dir")
    iss.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    iss.set_defaults(func=cmd_issue)

    tok = certs.add_parser("token", help="make one-time enrollment tokens (what a node manager gives a new host)")
    tok.add_argument("--count", type=int, default=1, help="tokens for any agent (ignored with --agent-id)")
    tok.add_argument("--agent-id", action="append", default=[],
                     help="a token only this bk_agent_id may use (also lets an enrolled id enroll again)")
    tok.add_argument("--ttl", type=float, default=86400.0, help="seconds a token stays valid (default 24 h)")
    tok.add_argument("--note", default="", help="free text kept with the token (who asked, which host)")
    tok.add_argument("--out", default="", help="write the tokens to this file (mode 0600) instead of stdout")
    _zk_flags(tok)
    tok.set_defaults(func=cmd_token)

    rev = certs.add_parser("revoke", help="revoke agents (or certificates): refused at once, live links cut")
    rev.add_argument("agent_id", nargs="*", help="bk_agent_ids")
    rev.add_argument("--serial", action="append", default=[], help="a certificate serial (hex), any role")
    rev.add_argument("--reason", default="")
    rev.add_argument("--lift", action="store_true", help="take them off the list instead")
    _zk_flags(rev)
    rev.set_defaults(func=cmd_revoke)

    lst = certs.add_parser("revoked", help="show the revocation list")
    _zk_flags(lst)
    lst.set_defaults(func=cmd_revoked)

    shm = certs.add_parser("shared-mode", help="the cluster switch for one agent certificate on every host")
    shm.add_argument("state", choices=("on", "off", "status"))
    _zk_flags(shm)
    shm.set_defaults(func=cmd_shared_mode)
