"""Checks of request bodies: every failure is a BadRequest whose message names the field."""

from __future__ import annotations

import ipaddress
from typing import Any

from gse.common.address import parse_host_id
from gse.common.records import valid_agent_id
from gse.common.errors import BadRequest


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


def integer(body: dict, field: str, *, required: bool = True, default: int = 0, minimum: int | None = None,
            maximum: int | None = None, where: str = "") -> int:
    """An integer; numeric strings are accepted because several clients send ids as strings."""
    name = f"{where}{field}"
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required")
        return default
    if isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer")
    if minimum is not None and value < minimum:
        raise BadRequest(f"'{name}' must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise BadRequest(f"'{name}' must be at most {maximum}")
    return value


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
