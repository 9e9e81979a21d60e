"""Fleet endpoints (spec section 11): operate_agent, host identity results, agent packages.

- `cluster/operate_agent` `{type, agent_id_list, current_version?, target_version_sign?, timeout?, force?,
  remark?}` -> `data.results`: the requested ids that were not found online (never seen, or offline: an
  operation reaches only an attached agent). type 1 restart, 2 reload, 3 upgrade to `target_version_sign`.
  An upgrade sends the package registered under that sign through the file path (a transfer from the
  package's source agent into `agent_upgrade_dir` on each target) and tells each target to install it once it
  has arrived; the targets show status 5 in `list_agent_state` until they report the upgrade done, rolled
  back or failed (or `timeout` seconds pass). `data.task_id` is the package transfer's task (readable with
  get_transfer_file_result).
- `cluster/register_agent_package` (extension) `{version_sign, version, file_name, store_dir, source_agent,
  sha256, size?}`: a package a node manager has put on a source host; kept in ZooKeeper
  (`<root>/config/agent_packages`) for every API server. `cluster/list_agent_packages` lists them.
- `cluster/get_host_identity_result` (extension) `{agent_id_list}` -> one entry per id:
  `{bk_agent_id, bk_host_id, status, md5, host_md5, version, update_time, push_time, sync_time, attempts,
  error_code, error_msg}`; status `synced` (the host's file is the wanted one), `pending` (not confirmed yet:
  changed, or the agent offline), `failed` (the agent could not write it: error_code and error_msg say why;
  tried again with back-off), `none` (syncdata holds no identity for it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict

from gse.common.errors import BadRequest
from gse.common.records import AgentRecord, now_ms
from gse.common.records.hostid import HostIdentityRecord
from gse.pb import agent_pb2 as apb

from . import validate as v
from .app import Api

log = logging.getLogger("gse.apiserver.fleet")

V2 = "/api/v2/cluster"
PACKAGES = "agent_packages"
RESTART, RELOAD, UPGRADE = 1, 2, 3
_SIGN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+:-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class FleetEndpoints:
    """The fleet endpoints of spec §11 and their extensions (see the module docstring), at /api/v2/cluster/<name>."""

    def __init__(self, view, servers, discovery, files, *, max_hosts: int, upgrade_dir: str):
        self.view = view                # AgentsView
        self.servers = servers          # TaskServers
        self.discovery = discovery
        self.files = files              # FileEndpoints: an upgrade's package goes through the file path
        self.max_hosts = max_hosts
        self.upgrade_dir = upgrade_dir.rstrip("/") or "/"

    def register(self, api: Api) -> None:
        """Serve operate_agent, register_agent_package, list_agent_packages and get_host_identity_result under
        /api/v2/cluster."""
        api.route(f"{V2}/operate_agent", self.operate_agent)
        api.route(f"{V2}/register_agent_package", self.register_agent_package)
        api.route(f"{V2}/list_agent_packages", self.list_agent_packages)
        api.route(f"{V2}/get_host_identity_result", self.get_host_identity_result)

    # ---- operate_agent ----------------------------------------------------------------------------

    async def operate_agent(self, body: dict, req):
        """cluster/operate_agent (spec §11): `{type 1|2|3, agent_id_list, target_version_sign (type 3), timeout?}` ->
        `{results: [ids not found online], task_id (type 3)}`. Sends AgentOperation to the live agents through the
        task servers holding them; an agent a task server no longer holds joins `results`. BadRequest for a bad type
        or id list, or an upgrade to a sign with no registered package."""
        op = v.integer(body, "type", minimum=1, maximum=3)
        ids = v.agent_ids(body, max_len=self.max_hosts)
        records = await self.view.by_ids(ids)
        at = now_ms()
        alive = {a: r for a, r in records.items() if r.alive(at)}
        missing = [a for a in dict.fromkeys(ids) if a not in alive]
        data: dict = {"results": missing}
        if not alive:
            return data
        operation = apb.AgentOperation(op=op, request_id=req.request_id)
        if op == UPGRADE:
            data["task_id"] = await self._upgrade(body, req, operation, alive, at)
        by_node: dict[str, list[str]] = defaultdict(list)
        for r in {r.agent_id: r for r in alive.values()}.values():
            by_node[r.node].append(r.agent_id)
        frame = apb.ServerFrame(operate=operation).SerializeToString()
        failures = await self.servers.dispatch(frame, by_node)
        failed = {a for a, _c, _m in failures}
        data["results"] += [a for a, r in alive.items() if r.agent_id in failed]
        log.info("agents operated", extra={"op": op, "agents": len(alive) - len(failed), "not_found": len(data["results"])})
        return data

    async def _upgrade(self, body: dict, req, operation: apb.AgentOperation, alive: dict, at: int) -> str:
        sign = v.string(body, "target_version_sign", max_len=128)
        timeout = v.integer(body, "timeout", required=False, default=600, minimum=10, maximum=86400)
        pkg = (self.discovery.config(PACKAGES) or {}).get(sign)
        if not isinstance(pkg, dict):
            raise BadRequest(f"'target_version_sign' {sign!r} names no registered agent package")
        operation.version = pkg["version"]
        operation.sha256 = pkg["sha256"]
        operation.size = int(pkg.get("size") or 0)
        operation.timeout_seconds = timeout
        dest_name = f"gse-agent-{pkg['sha256'][:16]}.tar.gz"
        operation.package_path = f"{self.upgrade_dir}/{dest_name}"
        records = {r.agent_id: r for r in alive.values()}
        targets = sorted(records)
        await self.view.db.execute([AgentRecord.update(
            a, upgrade_state="started", upgrade_version=pkg["version"], upgrade_from=records[a].version,
            upgrade_until=at + timeout * 1000, upgrade_error="", upgrade_time=at).op() for a in targets])
        transfer = {"timeout_seconds": timeout, "auto_mkdir": True, "tasks": [{
            "source": {"file_name": pkg["file_name"], "store_dir": pkg["store_dir"],
                       "agent": {"bk_agent_id": pkg["source_agent"], "user": "root"}},
            "target": {"file_name": dest_name, "store_dir": self.upgrade_dir, "owner": "root", "permission": 600,
                       "agents": [{"bk_agent_id": a, "user": "root"} for a in targets]}}]}
        result = await self.files.async_transfer_file(transfer, req)
        return result["result"]["task_id"]

    # ---- packages ---------------------------------------------------------------------------------

    async def register_agent_package(self, body: dict, _req):
        """cluster/register_agent_package: `{version_sign, version, file_name, store_dir, source_agent, sha256,
        size?}` -> the stored package with its sign. Kept in ZooKeeper config/agent_packages (a sign registered again
        is replaced); answers once this server's own view has it. BadRequest naming the field."""
        sign = v.string(body, "version_sign", max_len=128)
        if not _SIGN.fullmatch(sign):
            raise BadRequest("'version_sign' must be letters, digits and _.+:- (at most 128)")
        sha = v.string(body, "sha256", max_len=64).lower()
        if not _HEX64.fullmatch(sha):
            raise BadRequest("'sha256' must be 64 hex digits")
        pkg = {"version": v.string(body, "version", max_len=64), "sha256": sha,
               "file_name": v.string(body, "file_name", max_len=255),
               "store_dir": v.abs_dir(body, "store_dir"),
               "source_agent": v.agent_ids({"x": [v.string(body, "source_agent")]}, "x")[0],
               "size": v.integer(body, "size", required=False, default=0, minimum=0)}
        if "/" in pkg["file_name"]:
            raise BadRequest("'file_name' must be a plain file name")
        packages = dict(self.discovery.config(PACKAGES) or {})
        packages[sign] = pkg
        await self.discovery.put_config(PACKAGES, packages)
        # Answer once this server's own view has it (the watch follows within milliseconds), so that an
        # operate_agent sent right after the answer finds it.
        for _ in range(250):
            if (self.discovery.config(PACKAGES) or {}).get(sign) == pkg:
                break
            await asyncio.sleep(0.02)
        return {"version_sign": sign, **pkg}

    async def list_agent_packages(self, _body: dict, _req):
        """cluster/list_agent_packages: every registered package, `[{version_sign, version, sha256, file_name,
        store_dir, source_agent, size}]`, sorted by sign."""
        return [{"version_sign": s, **p} for s, p in sorted((self.discovery.config(PACKAGES) or {}).items())]

    # ---- host identity ----------------------------------------------------------------------------

    async def get_host_identity_result(self, body: dict, _req):
        """cluster/get_host_identity_result: `{agent_id_list}` -> one entry per requested id, in request order (see
        the module docstring for its fields and statuses); ids in "cloud:ip" form are resolved first."""
        ids = v.agent_ids(body, max_len=self.max_hosts)
        real = await self.view.resolve(ids)
        uniq = list(dict.fromkeys(real.values()))
        results = await self.view.db.execute([HostIdentityRecord.read(a) for a in uniq])
        wanted = {a: HostIdentityRecord.decode(r) for a, r in zip(uniq, results)}
        sessions = await self.view.records(uniq, ("hostid_md5", "hostid_version", "hostid_time",
                                                  "hostid_error_code", "hostid_error"))
        out = []
        for requested in ids:
            a = real.get(requested, requested)
            w, s = wanted.get(a), sessions.get(a)
            entry = {"bk_agent_id": requested, "bk_host_id": w.bk_host_id if w else 0, "md5": w.md5 if w else "",
                     "host_md5": s.hostid_md5 if s else "", "version": w.version if w else 0,
                     "update_time": w.version if w else 0, "push_time": w.pushed if w else 0,
                     "sync_time": 0, "attempts": w.attempts if w else 0, "error_code": 0,
                     "error_msg": (w.error if w else "")}
            if w is None:
                entry["status"] = "none"
            elif s is not None and s.hostid_md5 == w.md5:
                entry.update(status="synced", sync_time=s.hostid_time, error_msg="")
            elif s is not None and s.hostid_error_code and s.hostid_time >= w.pushed > 0:
                entry.update(status="failed", error_code=s.hostid_error_code, error_msg=s.hostid_error)
            else:
                entry["status"] = "pending"
            out.append(entry)
        return out

