"""The host identity document (spec section 11) and how a host is named.

The file collectors read (`/var/lib/gse/host/hostid`) is plain JSON:

    {"bk_host_id": 7, "bk_cloud_id": 0, "bk_host_innerip": "10.0.0.7,10.0.0.8", "bk_os_type": "1",
     "bk_supplier_account": "0",
     "associations": {"31": {"bk_biz_id": 2, "bk_set_id": 5, "bk_module_id": 31, "layer": null}},
     "process": [{"bk_process_id", "bk_process_name", "bind_ip", "port", "protocol", "bk_func_name",
                  "bk_start_param_regex", "bind_info": [...]}]}

`render` makes it from a CMDB host and its topology relations (or takes a file source's document), always
with sorted keys and no spaces, so that the same identity has the same bytes and md5 wherever it is made:
syncdata pushes only what changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

from gse.common.address import parse_host_id
from gse.common.errors import BadRequest
from gse.common.integers import integer_value
from gse.common.records import valid_agent_id

PROCESS_KEYS = ("bk_process_id", "bk_process_name", "bind_ip", "port", "protocol", "bk_func_name",
                "bk_start_param_regex", "bind_info")


class IdentityError(ValueError):
    """A source document that is not a host identity; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class Identity:
    """One host's identity file: `ref` names its agent (a bk_agent_id, or "cloud:ip" for hosts the CMDB knows
    without one), `content` is the file's bytes."""
    ref: str
    bk_host_id: int
    cloud_id: int
    ip: str
    content: bytes
    md5: str
    source: str


def _int(value: Any, what: str) -> int:
    """`value` by the project's one integer rule (gse.common.integers); IdentityError naming `what` otherwise."""
    try:
        return integer_value(value, what)
    except BadRequest as exc:
        raise IdentityError(f"{exc}, not {value!r}"[:200]) from None


def inner_ips(value: Any) -> list[str]:
    """bk_host_innerip as the CMDB gives it: "a,b" (older) or ["a", "b"] (newer)."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list):
        return [str(p).strip() for p in value if str(p).strip()]
    return []


def associations(relations: Iterable[dict]) -> dict[str, dict]:
    """`associations` from host_relation details ({bk_biz_id, bk_set_id, bk_module_id, ...})."""
    out: dict[str, dict] = {}
    for r in relations:
        module = _int(r.get("bk_module_id"), "bk_module_id")
        out[str(module)] = {"bk_biz_id": _int(r.get("bk_biz_id"), "bk_biz_id"),
                            "bk_set_id": _int(r.get("bk_set_id"), "bk_set_id"), "bk_module_id": module,
                            "layer": r.get("layer")}
    return out


def encode(doc: dict) -> bytes:
    """The canonical bytes of an identity document: compact JSON, keys sorted, UTF-8 (what the md5 and the file on the
    host are made of)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def make(doc: dict, source: str, ref: str = "") -> Identity:
    """An Identity from a whole document (§11 keys; `bk_agent_id` optional, names the agent). The agent is
    `ref`, else the document's bk_agent_id, else "<bk_cloud_id>:<first inner ip>"."""
    if not isinstance(doc, dict):
        raise IdentityError("a host identity must be a JSON object")
    host_id = _int(doc.get("bk_host_id"), "bk_host_id")
    cloud = _int(doc.get("bk_cloud_id", 0), "bk_cloud_id")
    ips = inner_ips(doc.get("bk_host_innerip"))
    if not isinstance(doc.get("associations"), dict):
        raise IdentityError("associations is required (an object keyed by bk_module_id)")
    agent_id = str(doc.get("bk_agent_id") or "")
    if not ref:
        if agent_id:
            if not valid_agent_id(agent_id):
                raise IdentityError(f"bk_agent_id {agent_id!r} is not an agent id")
            ref = agent_id
        elif ips:
            ref = f"{cloud}:{ips[0]}"
        else:
            raise IdentityError("neither bk_agent_id nor bk_host_innerip names the host's agent")
    body = {k: v for k, v in doc.items() if k != "bk_agent_id"}
    body["bk_host_innerip"] = ",".join(ips)
    body.setdefault("process", [])
    content = encode(body)
    return Identity(ref, host_id, cloud, ips[0] if ips else "", content, hashlib.md5(content).hexdigest(), source)


def render(host: dict, relations: Iterable[dict], processes: Iterable[dict] = (), source: str = "cmdb") -> Identity:
    """The identity of a CMDB host (its `host` detail) in the modules of `relations` (host_relation
    details). Its agent: the host's bk_agent_id when the CMDB has one, else cloud:first inner ip."""
    doc = {
        "bk_host_id": _int(host.get("bk_host_id"), "bk_host_id"),
        "bk_cloud_id": _int(host.get("bk_cloud_id") or 0, "bk_cloud_id"),
        "bk_host_innerip": ",".join(inner_ips(host.get("bk_host_innerip"))),
        "bk_os_type": str(host.get("bk_os_type") or ""),
        "bk_supplier_account": str(host.get("bk_supplier_account") or "0"),
        "associations": associations(relations),
        "process": [{k: p.get(k) for k in PROCESS_KEYS if k in p} for p in processes],
    }
    agent_id = str(host.get("bk_agent_id") or "")
    ref = agent_id if agent_id and valid_agent_id(agent_id) and parse_host_id(agent_id) is None else ""
    return make(doc, source, ref)
