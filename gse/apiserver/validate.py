"""Checks of request bodies: every failure is a BadRequest whose message names the field."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from gse.common.address import parse_host_id
from gse.common.records import valid_agent_id, valid_task_id
from gse.common.errors import BadRequest
from gse.common.integers import integer, integer_value

__all__ = ["abs_dir", "agent_ids", "hosts", "integer", "integer_value", "lst", "obj", "string", "task_id"]


def obj(body: Any, field: str) -> dict:
    """`body[field]` as an object; BadRequest naming the field when it is missing or not an object."""
    value = body.get(field) if isinstance(body, dict) else None
    if not isinstance(value, dict):
        raise BadRequest(f"'{field}' is required and must be an object")
    return value


def lst(body: dict, field: str, *, max_len: int | None = None, required: bool = True, non_empty: bool = True) -> list:
    """`body[field]` as a list (of at most `max_len` entries; not empty unless `non_empty` is False); [] for an absent
    optional one. BadRequest naming the field otherwise."""
    value = body.get(field)
    if value is None and not required:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"'{field}' is required and must be a list")
    if non_empty and not value:
        raise BadRequest(f"'{field}' must not be empty")
    if max_len is not None and len(value) > max_len:
        raise BadRequest(f"'{field}' has {len(value)} entries; at most {max_len} are allowed per call")
    return value


def string(body: dict, field: str, *, required: bool = True, default: str = "", max_len: int = 4096,
           where: str = "") -> str:
    """`body[field]` as a string of at most `max_len` characters; a required one must not be empty, an absent optional
    one is `default`. BadRequest naming `<where><field>` otherwise."""
    name = f"{where}{field}"
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required")
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string")
    if required and not value:
        raise BadRequest(f"'{name}' must not be empty")
    if len(value) > max_len:
        raise BadRequest(f"'{name}' is longer than {max_len} characters")
    return value


def task_id(body: dict, field: str = "task_id") -> str:
    """The task id in `body[field]` (spec §4, §8: result, terminate and process result reads); BadRequest when it
    is missing or not a task id (`records.valid_task_id`)."""
    value = string(body, field, max_len=128)
    if not valid_task_id(value):
        raise BadRequest(f"'{field}' is not a task id")
    return value


def abs_dir(body: dict, field: str, *, where: str = "") -> str:
    """`body[field]` as a normalised absolute directory without '..' components (a file transfer's or push's
    `store_dir`, spec §4); BadRequest naming `<where><field>` when it is missing, empty or relative, or
    escapes with '..' (1000400)."""
    value = string(body, field, where=where)
    if not os.path.isabs(value) or ".." in value.split("/"):
        raise BadRequest(f"'{where}{field}' must be an absolute path without '..'")
    return os.path.normpath(value)


def hosts(body: dict, field: str = "hosts", max_len: int = 5000) -> list[tuple[int, str]]:
    """A v1 host list: [{ip, bk_cloud_id}] -> [(cloud, ip)] in request order."""
    out = []
    for i, h in enumerate(lst(body, field, max_len=max_len)):
        where = f"{field}[{i}]."
        if not isinstance(h, dict):
            raise BadRequest(f"'{field}[{i}]' must be an object with ip and bk_cloud_id")
        ip = string(h, "ip", where=where, max_len=64)
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise BadRequest(f"'{where}ip' is not an IP address: {ip!r}") from None
        out.append((integer(h, "bk_cloud_id", where=where, minimum=0), ip))
    return out


def agent_ids(body: dict, field: str = "agent_id_list", max_len: int = 5000) -> list[str]:
    """A list of agent ids, each a bk_agent_id or "{bk_cloud_id}:{ip}"."""
    out = []
    for i, a in enumerate(lst(body, field, max_len=max_len)):
        if not isinstance(a, str):
            raise BadRequest(f"'{field}[{i}]' must be a string")
        if parse_host_id(a) is None and not valid_agent_id(a):
            raise BadRequest(f"'{field}[{i}]' is neither a bk_agent_id (1-64 characters) nor 'cloud:ip': {a[:80]!r}")
        out.append(a)
    return out
