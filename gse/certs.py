"""`gse certs`: the cluster CA and the certificates of every role (gse/common/tls.py, gse/common/roles.py).

    gse certs init  --dir DIR [--san NAME]... [--shared-agent] [--force]
    gse certs issue --dir DIR --role ROLE --name NAME [--agent-id ID] [--san NAME]... [--days N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gse.common import roles
from gse.common.tls import CA, CertError, init_certs


def cmd_init(args) -> int:
    d = init_certs(args.dir, args.san, force=args.force, shared_agent=args.shared_agent)
    names = ["ca", "server", "api", "operator"] + (["agent"] if args.shared_agent else [])
    for name in names:
        print(d / f"{name}.crt")
    return 0


def cmd_issue(args) -> int:
    d = Path(args.dir)
    out = Path(args.out or args.dir)
    name = args.name or (args.agent_id if args.agent_id else args.role)
    if not args.force and (out / f"{name}.crt").exists():
        raise SystemExit(f"gse certs issue: {out / (name + '.crt')} exists (--force replaces it)")
    try:
        ca = CA.load(d / "ca.crt", d / "ca.key")
        out.mkdir(parents=True, exist_ok=True)
        path = ca.issue_files(out, name, args.role, agent_id=args.agent_id, sans=args.san, days=args.days)
    except CertError as exc:
        raise SystemExit(f"gse certs issue: {exc}") from None
    print(path)
    return 0


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
    iss.add_argument("--days", type=int, default=825)
    iss.add_argument("--out", default="", help="write the pair here instead of --dir")
    iss.add_argument("--force", action="store_true", help="replace an existing pair of that name")
    iss.set_defaults(func=cmd_issue)
