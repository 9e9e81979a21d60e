"""Checks of request bodies: every failure is a BadRequest whose message names the field."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Any

from gse.common.address import parse_host_id
from gse.common.records import valid_agent_id, valid_task_id
from gse.common.errors import BadRequest

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
_INT_TEXT = re.compile(r"\s*([+-]?)([0-9]+)\s*", re.ASCII)


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


def integer(body: dict, field: str, *, required: bool = True, default: int | None = 0, minimum: int | None = None,
            maximum: int | None = None, where: str = "") -> int | None:
    """`body[field]` as an int by `integer_value`'s rule, within [minimum, maximum] (int64 when not given); an
    absent or null field is `default` when not `required`, else BadRequest "'<where><field>' is required"."""
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(f"'{where}{field}' is required")
        return default
    return integer_value(value, f"{where}{field}", minimum=minimum, maximum=maximum)


def integer_value(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int: the one rule of what counts as an integer in a request body, for every endpoint (data
    routes included, gse.common.dataroutes). Accepted:

    - a JSON integer;
    - a JSON number without a fraction (5.0): JSON has one number type, and encoders differ on how they write
      an integral value;
    - a string of ASCII digits with an optional sign and surrounding blanks ("42", " -1 "): several clients send
      ids and settings as strings (bk-nodeman's global settings, CMDB ids).

    Refused with BadRequest naming `name`: booleans (`true` is no count), fractions (5.5), NaN and infinities,
    other strings ("4.0", "0x10", "1_000", non-ASCII digits) and anything else ("must be an integer"); values
    outside [minimum, maximum] ("must be at least/at most"), which default to the int64 range the wire carries."""
    low = INT64_MIN if minimum is None else minimum
    high = INT64_MAX if maximum is None else maximum
    if isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BadRequest(f"'{name}' must be an integer")
        value = int(value)
    elif isinstance(value, str):
        m = _INT_TEXT.fullmatch(value)
        if m is None:
            raise BadRequest(f"'{name}' must be an integer")
        sign, digits = m.group(1), m.group(2).lstrip("0") or "0"
        if len(digits) > 19:            # past int64 (and never handed to int(): bounded work)
            raise BadRequest(f"'{name}' must be at least {low}" if sign == "-" else f"'{name}' must be at most {high}")
        value = int(sign + digits)
    elif not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer")
    if value < low:
        raise BadRequest(f"'{name}' must be at least {low}")
    if value > high:
        raise BadRequest(f"'{name}' must be at most {high}")
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
