"""Process management endpoints (spec sections 3 and 8), served by calling procmgr (gse/pb/procmgr.proto).

Every name is served under both prefixes, `/api/c/compapi/v2/gse/<name>` (v1, the ESB) and
`/api/v2/proc/<name>` (v2): the node manager and the process config manager call the `_v2` names under the
ESB prefix too. The names: operate_proc, operate_proc_v2, operate_proc_multi, get_proc_operate_result,
get_proc_operate_result_v2, get_proc_status, get_proc_status_v2, sync_proc_status, register_proc_info,
update_proc_info, unregister_proc_info, upgrade_to_agent_id, set_process_group_info, get_process_group_info,
and the operator extension list_proc.

Result keys (spec section 3): `get_proc_operate_result` and the v1 registration calls answer
"{cloud}:{supplier}:{ip}:{namespace}:{name}"; `get_proc_operate_result_v2` answers "{id}:{namespace}:{name}"
with id the agent as the caller named it (a bk_agent_id, or "cloud:ip" for `hosts` and for ids given in that
form). Request bodies are checked here: a missing or wrong field is 1000400 naming it; an unknown `op_type`
is not (the task's targets answer 832).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os

import grpc

from gse.common.errors import BadRequest, TaskNotKnown, Unavailable
from gse.common.logs import set_trace
from gse.common.rpc import ChannelPool, trace_metadata
from gse.common.tls import TLSMaterial
from gse.pb import agent_pb2 as apb
from gse.pb import procmgr_pb2 as pb
from gse.pb import procmgr_pb2_grpc as pb_grpc

from . import validate as v
from .app import Api

log = logging.getLogger("gse.apiserver.procs")

V1 = "/api/c/compapi/v2/gse"
V2 = "/api/v2/proc"
MAX_NAME = 256
SYNC_MAX_LIMIT = 1000

_STR_CONTROL = ("start_cmd", "stop_cmd", "restart_cmd", "reload_cmd", "kill_cmd", "version_cmd", "health_cmd")
_INT_POLICY = ("start_check_secs", "stop_check_secs", "start_retries", "start_interval", "op_timeout",
               "health_check_secs")


class ProcMgrs:
    """The procmgrs registered in ZooKeeper (`on_view`) and calls to them: any one will do; a call that finds
    one unreachable tries the next. None reachable: Unavailable (1000503)."""

    def __init__(self, tls: TLSMaterial, timeout_s: float = 30.0):
        self.pool = ChannelPool(tls)
        self.addresses: list[str] = []
        self.timeout_s = timeout_s
        self._rr = itertools.count()

    def on_view(self, view: dict[str, dict]) -> None:
        """ZooKeeper view of the procmgrs: keep their addresses (sorted) and drop the channels of those gone."""
        self.addresses = sorted(i["address"] for i in view.values() if i.get("address"))
        self.pool.retain(self.addresses)

    async def call(self, method: str, request):
        """Call ProcService `method` with `request` on the procmgrs in turn (round-robin start) within `timeout_s`
        seconds each, carrying the trace metadata; the next one is tried only when a procmgr is unreachable or timed
        out. Raises Unavailable (1000503) when none is registered, none answered, or one answered with another error."""
        addrs = self.addresses
        if not addrs:
            raise Unavailable("no procmgr is registered")
        start = next(self._rr)
        last = None
        for i in range(len(addrs)):
            addr = addrs[(start + i) % len(addrs)]
            stub = pb_grpc.ProcServiceStub(self.pool.get(addr))
            try:
                return await getattr(stub, method)(request, timeout=self.timeout_s, metadata=trace_metadata())
            except grpc.aio.AioRpcError as exc:
                last = exc
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise Unavailable(f"procmgr {addr}: {exc.code().name}: {exc.details()}") from None
                log.warning("procmgr call failed; trying another", extra={"address": addr, "code": exc.code().name})
        raise Unavailable(f"no procmgr answered: {last.code().name if last else 'none'}")

    async def close(self) -> None:
        """Close the channels to the procmgrs."""
        await self.pool.close()


# ---- request parsing -------------------------------------------------------------------------------

def _name(d: dict, field: str, where: str, required: bool = True) -> str:
    s = v.string(d, field, where=where, max_len=MAX_NAME, required=required)
    if ":" in s or any(not ch.isprintable() for ch in s):
        raise BadRequest(f"'{where}{field}' must not hold ':' or control characters")
    return s


def meta_of(body: dict, where: str = "", need_name: bool = True) -> tuple[str, str, str]:
    """(namespace, name, labels as JSON text) of `meta`."""
    m = body.get("meta")
    if not isinstance(m, dict):
        raise BadRequest(f"'{where}meta' is required and must be an object")
    ns = _name(m, "namespace", f"{where}meta.")
    name = _name(m, "name", f"{where}meta.", required=need_name)
    labels = m.get("labels")
    if labels is None:
        labels_json = ""
    elif not isinstance(labels, dict) or any(isinstance(x, (dict, list)) for x in labels.values()):
        raise BadRequest(f"'{where}meta.labels' must be an object of scalar values")
    else:
        labels_json = json.dumps(labels, ensure_ascii=False, separators=(",", ":"))
    return ns, name, labels_json


def _abs_path(d: dict, field: str, where: str, required: bool = True) -> str:
    p = v.string(d, field, where=where, required=required, max_len=4096)
    if p and (not os.path.isabs(p) or ".." in p.split("/") or "\0" in p):
        raise BadRequest(f"'{where}{field}' must be an absolute path without '..': {p[:200]!r}")
    return p


def _number(d: dict, field: str, where: str) -> float:
    x = d.get(field)
    if x is None:
        return 0.0
    if isinstance(x, str):
        try:
            x = float(x)
        except ValueError:
            raise BadRequest(f"'{where}{field}' must be a number") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise BadRequest(f"'{where}{field}' must be a non-negative number")
    return float(x)


def spec_of(body: dict, where: str) -> apb.ProcSpec | None:
    """`spec` (identity, control, resource, alive_monitor_policy | monitor_policy) as a ProcSpec; None when
    absent. Optional fields may be absent or null."""
    s = body.get("spec")
    if s is None:
        return None
    if not isinstance(s, dict):
        raise BadRequest(f"'{where}spec' must be an object")
    w = f"{where}spec."
    ident = s.get("identity")
    if not isinstance(ident, dict):
        raise BadRequest(f"'{w}identity' is required and must be an object")
    wi = f"{w}identity."
    spec = apb.ProcSpec(proc_name=v.string(ident, "proc_name", where=wi, max_len=MAX_NAME),
                        setup_path=_abs_path(ident, "setup_path", wi), pid_path=_abs_path(ident, "pid_path", wi),
                        user=v.string(ident, "user", where=wi, max_len=64),
                        config_path=v.string(ident, "config_path", where=wi, required=False),
                        log_path=v.string(ident, "log_path", where=wi, required=False),
                        index_key=v.string(ident, "index_key", where=wi, required=False))
    control = s.get("control") or {}
    if not isinstance(control, dict):
        raise BadRequest(f"'{w}control' must be an object")
    for f in _STR_CONTROL:
        setattr(spec, f, v.string(control, f, where=f"{w}control.", required=False, max_len=64 * 1024))
    resource = s.get("resource") or {}
    if not isinstance(resource, dict):
        raise BadRequest(f"'{w}resource' must be an object")
    spec.cpu, spec.mem = _number(resource, "cpu", f"{w}resource."), _number(resource, "mem", f"{w}resource.")
    pname = "alive_monitor_policy" if s.get("alive_monitor_policy") is not None else "monitor_policy"
    policy = s.get(pname) or {}
    if not isinstance(policy, dict):
        raise BadRequest(f"'{w}{pname}' must be an object")
    wp = f"{w}{pname}."
    spec.auto_type = v.integer(policy, "auto_type", where=wp, required=False, default=1, minimum=0, maximum=2)
    for f in _INT_POLICY:
        setattr(spec, f, v.integer(policy, f, where=wp, required=False, default=0, minimum=0, maximum=86400))
    spec.crontab_rule = v.string(policy, "crontab_rule", where=wp, required=False, max_len=256)
    if spec.auto_type == 0 and spec.crontab_rule:
        from croniter import croniter
        if not croniter.is_valid(spec.crontab_rule):
            raise BadRequest(f"'{wp}crontab_rule' is not a crontab rule: {spec.crontab_rule!r}")
    return spec


def targets_of(body: dict, where: str, max_hosts: int) -> list[pb.Target]:
    """`agent_id_list` (bk_agent_id or "cloud:ip") or `hosts` ([{ip, bk_cloud_id, bk_supplier_id?}])."""
    if body.get("agent_id_list") is not None:
        ids = _prefixed(lambda: v.agent_ids(body, "agent_id_list", max_len=max_hosts), where)
        return [pb.Target(requested=a) for a in ids]
    if body.get("hosts") is None:
        raise BadRequest(f"'{where}agent_id_list' or '{where}hosts' is required")
    hosts = _prefixed(lambda: v.hosts(body, "hosts", max_len=max_hosts), where)
    out = []
    for (cloud, ip), h in zip(hosts, body["hosts"]):
        supplier = v.integer(h, "bk_supplier_id", required=False, default=0, minimum=0) if isinstance(h, dict) else 0
        out.append(pb.Target(cloud_id=cloud, ip=ip, supplier_id=supplier, by_host=True,
                             requested=f"{cloud}:{ip}"))
    return out


def _prefixed(fn, where: str):
    try:
        return fn()
    except BadRequest as exc:
        if where and exc.message.startswith("'"):
            raise BadRequest("'" + where + exc.message[1:]) from None
        raise


def v1_key(t: pb.Target, namespace: str, name: str) -> str:
    """The v1 result key of a target (spec section 3): "{bk_cloud_id}:{bk_supplier_id}:{ip}:{namespace}:{name}"."""
    return f"{t.cloud_id}:{t.supplier_id}:{t.ip}:{namespace}:{name}"


def v2_key(t: pb.Target, namespace: str, name: str) -> str:
    """The v2 result key (spec section 8): "{id}:{namespace}:{name}", the id as the caller named the agent (a
    bk_agent_id, or "cloud:ip")."""
    return f"{t.requested}:{namespace}:{name}"


# ---- the endpoints ---------------------------------------------------------------------------------

class ProcEndpoints:
    """Spec sections 3 and 8, by calling procmgr."""

    def __init__(self, procmgrs: ProcMgrs, max_hosts: int):
        self.pm = procmgrs
        self.max_hosts = max_hosts

    def register(self, api: Api) -> None:
        """Route every process endpoint under both prefixes (v1 ESB `/api/c/compapi/v2/gse/<name>` and v2
        `/api/v2/proc/<name>`)."""
        handlers = {
            "operate_proc": self.operate_proc, "operate_proc_v2": self.operate_proc,
            "operate_proc_multi": self.operate_proc_multi,
            "get_proc_operate_result": self.get_result_v1, "get_proc_operate_result_v2": self.get_result_v2,
            "get_proc_status": self.get_proc_status, "get_proc_status_v2": self.get_proc_status,
            "sync_proc_status": self.sync_proc_status,
            "register_proc_info": self.register_proc_info, "update_proc_info": self.update_proc_info,
            "unregister_proc_info": self.unregister_proc_info,
            "upgrade_to_agent_id": self.upgrade_to_agent_id,
            "set_process_group_info": self.set_process_group_info,
            "get_process_group_info": self.get_process_group_info,
            "list_proc": self.list_proc,
        }
        for prefix in (V1, V2):
            for name, handler in handlers.items():
                api.route(f"{prefix}/{name}", handler, name)

    def _entry(self, body: dict, where: str, *, need_op: bool = True) -> pb.ProcEntry:
        if not isinstance(body, dict):
            raise BadRequest(f"'{where.rstrip('.')}' must be an object")
        ns, name, labels = meta_of(body, where)
        entry = pb.ProcEntry(namespace=ns, name=name, labels_json=labels,
                             targets=targets_of(body, where, self.max_hosts))
        if need_op:
            entry.op_type = v.integer(body, "op_type", where=where, minimum=-2**31, maximum=2**31 - 1)
        spec = spec_of(body, where)
        if spec is not None:
            entry.has_spec = True
            entry.spec.CopyFrom(spec)
        return entry

    def _check_count(self, entries) -> None:
        n = sum(len(e.targets) for e in entries)
        if n > self.max_hosts:
            raise BadRequest(f"the request names {n} targets; at most {self.max_hosts} are allowed per call")

    async def operate_proc(self, body: dict, req):
        """operate_proc / operate_proc_v2: `{meta, op_type, agent_id_list | hosts, spec?}` -> `{task_id}`."""
        entry = self._entry(body, "")
        reply = await self.pm.call("Operate", pb.OperateRequest(entries=[entry], request_id=req.request_id))
        set_trace(task_id=reply.task_id)
        return {"task_id": reply.task_id}

    async def operate_proc_multi(self, body: dict, req):
        """`{proc_operate_req: [ {meta, op_type, agent_id_list | hosts, spec} ]}` -> `{task_id}`."""
        items = v.lst(body, "proc_operate_req", max_len=self.max_hosts)
        entries = [self._entry(item, f"proc_operate_req[{i}].") for i, item in enumerate(items)]
        self._check_count(entries)
        reply = await self.pm.call("Operate", pb.OperateRequest(entries=entries, request_id=req.request_id))
        set_trace(task_id=reply.task_id)
        return {"task_id": reply.task_id}

    async def _results(self, body: dict) -> pb.TargetResults:
        task_id = v.task_id(body)
        set_trace(task_id=task_id)
        res = await self.pm.call("Result", pb.ResultRequest(task_id=task_id))
        if not res.known:
            raise TaskNotKnown(task_id)
        return res

    @staticmethod
    def _result_doc(r: pb.TargetResult) -> dict:
        return {"error_code": r.error_code, "error_msg": r.error_msg, "content": r.content}

    async def get_result_v1(self, body: dict, _req):
        """`{task_id}` -> `{"cloud:supplier:ip:ns:name": {error_code, error_msg, content}}` (spec section 3)."""
        res = await self._results(body)
        return {v1_key(r.target, r.namespace, r.name): self._result_doc(r) for r in res.results}

    async def get_result_v2(self, body: dict, _req):
        """`{task_id}` -> `{"<id>:ns:name": {error_code, error_msg, content}}` (spec section 8)."""
        res = await self._results(body)
        return {v2_key(r.target, r.namespace, r.name): self._result_doc(r) for r in res.results}

    @staticmethod
    def _info(i: pb.ProcInfo, labels_json: str) -> dict:
        labels = {}
        text = i.labels_json or labels_json
        if text:
            try:
                labels = json.loads(text)
            except ValueError:
                labels = {}
        return {"meta": {"namespace": i.namespace, "name": i.name, "labels": labels},
                "host": {"ip": i.ip, "bk_cloud_id": i.cloud_id}, "bk_agent_id": i.bk_agent_id,
                "status": i.status, "isauto": i.isauto, "message": i.message, "pid": i.pid, "version": i.version,
                "register_time": i.register_time, "last_start_time": i.last_start_time,
                "report_time": i.report_time, "cpu_usage": round(i.cpu_usage, 2), "mem_usage": round(i.mem_usage, 2),
                "fd": i.fd, "disk": 0, "net": 0, "flag": i.flag}

    async def get_proc_status(self, body: dict, _req):
        """get_proc_status(_v2): `{meta, agent_id_list | hosts}` -> `{proc_infos}`, one per host."""
        ns, name, labels = meta_of(body)
        targets = targets_of(body, "", self.max_hosts)
        res = await self.pm.call("Status", pb.StatusRequest(namespace=ns, name=name, targets=targets))
        return {"proc_infos": [self._info(i, labels) for i in res.infos]}

    async def sync_proc_status(self, body: dict, _req):
        """`{meta {namespace}, page {start, limit}}` (or top-level `offset`, `limit`) -> `{count, proc_infos}`."""
        ns, _n, _l = meta_of(body, need_name=False)
        page = body.get("page")
        if page is not None and not isinstance(page, dict):
            raise BadRequest("'page' must be an object")
        src, where = (page, "page.") if page is not None else (body, "")
        start = v.integer(src, "start" if page is not None else "offset", where=where, required=False, default=0,
                          minimum=0)
        limit = v.integer(src, "limit", where=where, required=False, default=SYNC_MAX_LIMIT, minimum=1,
                          maximum=SYNC_MAX_LIMIT)
        res = await self.pm.call("Sync", pb.SyncRequest(namespace=ns, offset=start, limit=limit))
        return {"count": res.count, "proc_infos": [self._info(i, "") for i in res.infos]}

    async def list_proc(self, body: dict, _req):
        """Extension (gse proc list): `{agent_id_list}` -> `{proc_infos}` of every process of those agents."""
        targets = targets_of(body, "", self.max_hosts)
        res = await self.pm.call("List", pb.ListRequest(targets=targets))
        return {"proc_infos": [self._info(i, "") for i in res.infos]}

    async def _define(self, body: dict, action: int):
        entry = self._entry(body, "", need_op=False)
        if action in (1, 2) and not entry.has_spec:
            raise BadRequest("'spec' is required")
        res = await self.pm.call("Define", pb.DefineRequest(action=action, entries=[entry]))
        return {v1_key(r.target, r.namespace, r.name): self._result_doc(r) for r in res.results}

    async def register_proc_info(self, body: dict, _req):
        """v1: `{meta, hosts, spec}` -> per host `{error_code (0, 850 already registered), error_msg, content}`."""
        return await self._define(body, 1)

    async def update_proc_info(self, body: dict, _req):
        """v1: `{meta, hosts, spec}` -> per host result (registers when absent)."""
        return await self._define(body, 2)

    async def unregister_proc_info(self, body: dict, _req):
        """v1: `{meta, hosts}` -> per host result (829 when it was not registered)."""
        return await self._define(body, 3)

    async def upgrade_to_agent_id(self, body: dict, _req):
        """`{hosts: [{ip, bk_cloud_id, bk_agent_id}]}` -> `{success: ["cloud:ip"], failed: [...]}`."""
        hosts = v.hosts(body, "hosts", max_len=self.max_hosts)
        req = pb.UpgradeRequest()
        for i, ((cloud, ip), h) in enumerate(zip(hosts, body["hosts"])):
            req.hosts.add(cloud_id=cloud, ip=ip,
                          agent_id=v.string(h, "bk_agent_id", where=f"hosts[{i}].", max_len=64))
        res = await self.pm.call("UpgradeToAgentId", req)
        return {"success": list(res.success), "failed": list(res.failed)}

    async def set_process_group_info(self, body: dict, _req):
        """`{meta {namespace}, agent_id_list | hosts, spec {process_group: [{id, resource {cpu_pool_limit,
        mem_pool_limit, cpu_pool_weight, mem_pool_weight}}]}}` -> `{"<id>:<namespace>": {error_code, error_msg}}`."""
        ns, _n, _l = meta_of(body, need_name=False)
        targets = targets_of(body, "", self.max_hosts)
        spec = v.obj(body, "spec")
        req = pb.GroupsRequest(namespace=ns, targets=targets)
        for i, g in enumerate(v.lst(spec, "process_group", non_empty=False, max_len=1000)):
            w = f"spec.process_group[{i}]."
            if not isinstance(g, dict):
                raise BadRequest(f"'spec.process_group[{i}]' must be an object")
            gid = g.get("id")
            if gid is None or isinstance(gid, (dict, list, bool)):
                raise BadRequest(f"'{w}id' is required (a string or an integer)")
            res = g.get("resource") or {}
            if not isinstance(res, dict):
                raise BadRequest(f"'{w}resource' must be an object")
            req.groups.add(id=str(gid), **{f: _number(res, f, f"{w}resource.") for f in (
                "cpu_pool_limit", "mem_pool_limit", "cpu_pool_weight", "mem_pool_weight")})
        res = await self.pm.call("SetGroups", req)
        return {f"{r.target.requested}:{r.namespace}": {"error_code": r.error_code, "error_msg": r.error_msg}
                for r in res.results}

    async def get_process_group_info(self, body: dict, _req):
        """`{meta {namespace}, agent_id_list | hosts}` -> `[{bk_agent_id, host, process_group: [...]}]`."""
        ns, _n, _l = meta_of(body, need_name=False)
        res = await self.pm.call("GetGroups", pb.GroupsQuery(namespace=ns, targets=targets_of(body, "",
                                                                                           self.max_hosts)))
        return [{"bk_agent_id": h.target.requested, "host": {"ip": h.target.ip, "bk_cloud_id": h.target.cloud_id},
                 "process_group": [{"id": g.id, "resource": {
                     "cpu_pool_limit": g.cpu_pool_limit, "mem_pool_limit": g.mem_pool_limit,
                     "cpu_pool_weight": g.cpu_pool_weight, "mem_pool_weight": g.mem_pool_weight}}
                     for g in h.groups]} for h in res.hosts]

