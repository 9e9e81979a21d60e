"""Data route definitions (spec section 3 "Data routes"): checking and normalising what the API receives.

The API server checks every definition here before it is stored in ZooKeeper; data servers read the stored,
normalised documents back. Every failure is a BadRequest whose message names the field, e.g.
`'route[0].stream_to.kafka.topic_name' is required`.

Normalised documents (stored as JSON under <root>/config/data/, see gse.common.datastate):

  stream_to: {stream_to_id, metadata {plat_name, label}, stream_to {name, report_mode, kafka|redis|file ...},
              operator, updated_ms}
  route:     {channel_id, metadata {plat_name, label, channel_id}, route [entry], stream_filters [filter],
              operator, updated_ms}
  entry:     {name, stream_to {stream_to_id, kafka {topic_name, partition?} | redis {channel_name, data_type}
              | file {file_name}}, filter_name_and [..], filter_name_or [..]}

Decisions beyond the spec: a redis route takes `data_type` pubsub (default) | list (RPUSH) | stream (XADD);
a file route takes an optional `file_name` (default `channel_<channel_id>.log`) under the stream_to's
`data_log_path`; report_mode pulsar is refused as not supported. Filters with `field_in: protocol` see the
fields [data_id, bk_cloud_id, ip, bk_agent_id] of the batch the record came in. Integers follow the API's one
rule (gse.common.integers: numeric strings and integral numbers count, booleans do not).
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from gse.common import integers as v

from .errors import BadRequest

REPORT_MODES = ("kafka", "redis", "file")
REDIS_TYPES = ("pubsub", "list", "stream")
FIELD_TYPES = ("int", "string", "bytes")
FIELD_IN = ("protocol", "data")
PROTOCOL_FIELDS = ("data_id", "bk_cloud_id", "ip", "bk_agent_id")
_NAME = re.compile(r"^[\w.\-]{1,255}$")
_FILE_NAME = re.compile(r"^[\w.\-]{1,255}$")


def _obj(value: Any, where: str, required: bool = True) -> dict:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{where}' is required and must be an object")
    return value


def _str(d: dict, key: str, where: str, *, required: bool = True, max_len: int = 1024) -> str:
    value = d.get(key)
    name = f"{where}{key}"
    if value is None or value == "":
        if required:
            raise BadRequest(f"'{name}' is required")
        return ""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string")
    if len(value) > max_len:
        raise BadRequest(f"'{name}' is longer than {max_len} characters")
    return value


def label(d: dict, where: str) -> dict[str, str]:
    """The optional `label` of `d` as str -> str (plain values turned to text); BadRequest naming `<where>label` when
    it is not an object of plain values."""
    value = d.get("label")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                              for k, v in value.items()):
        raise BadRequest(f"'{where}label' must be an object of string keys and plain values")
    return {k: str(v) for k, v in value.items()}


def metadata(body: dict, where: str = "metadata") -> dict:
    """`metadata {plat_name (required), label}` of an add request, normalised; BadRequest naming the field."""
    md = _obj(body.get("metadata"), where)
    return {"plat_name": _str(md, "plat_name", f"{where}.", max_len=128), "label": label(md, f"{where}.")}


def operator(body: dict) -> str:
    """`operation.operator_name` (required by every data-route call, spec §3); BadRequest when missing."""
    op = _obj(body.get("operation"), "operation")
    return _str(op, "operator_name", "operation.", max_len=128)


def _addresses(d: dict, where: str) -> list[dict]:
    value = d.get("storage_address")
    name = f"{where}storage_address"
    if not isinstance(value, list) or not value:
        raise BadRequest(f"'{name}' is required and must be a non-empty list of {{ip, port}}")
    out = []
    for i, a in enumerate(value):
        w = f"{name}[{i}]."
        if not isinstance(a, dict):
            raise BadRequest(f"'{name}[{i}]' must be an object with ip and port")
        host = _str(a, "ip", w, max_len=255)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.match(r"^[A-Za-z0-9.\-]+$", host):
                raise BadRequest(f"'{w}ip' is neither an IP address nor a host name: {host!r}") from None
        out.append({"ip": host, "port": v.integer(a, "port", where=w, minimum=1, maximum=65535)})
    return out


def stream_to(value: Any, where: str = "stream_to") -> dict:
    """A stream_to (output definition) as add_streamto / update_streamto take it."""
    st = _obj(value, where)
    w = f"{where}."
    mode = _str(st, "report_mode", w, max_len=16)
    if mode == "pulsar":
        raise BadRequest(f"'{w}report_mode' pulsar is not supported by this GSE; use kafka, redis or file")
    if mode not in REPORT_MODES:
        raise BadRequest(f"'{w}report_mode' must be one of kafka, redis, file (got {mode!r})")
    out: dict = {"name": _str(st, "name", w, max_len=255), "report_mode": mode}
    if mode == "kafka":
        k = _obj(st.get("kafka"), f"{w}kafka")
        kw = f"{w}kafka."
        out["kafka"] = {"storage_address": _addresses(k, kw),
                        "sasl_username": _str(k, "sasl_username", kw, required=False),
                        "sasl_passwd": _str(k, "sasl_passwd", kw, required=False),
                        "sasl_mechanisms": _str(k, "sasl_mechanisms", kw, required=False, max_len=32),
                        "security_protocol": _str(k, "security_protocol", kw, required=False, max_len=32)}
        sp = out["kafka"]["security_protocol"]
        if sp and sp not in ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"):
            raise BadRequest(f"'{kw}security_protocol' must be PLAINTEXT, SASL_PLAINTEXT, SASL_SSL or SSL")
        mech = out["kafka"]["sasl_mechanisms"]
        if mech and mech not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
            raise BadRequest(f"'{kw}sasl_mechanisms' must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    elif mode == "redis":
        r = _obj(st.get("redis"), f"{w}redis")
        rw = f"{w}redis."
        out["redis"] = {"storage_address": _addresses(r, rw), "passwd": _str(r, "passwd", rw, required=False),
                        "master_name": _str(r, "master_name", rw, required=False, max_len=255)}
    else:
        path = _str(st, "data_log_path", w)
        if not os.path.isabs(path) or ".." in path.split("/"):
            raise BadRequest(f"'{w}data_log_path' must be an absolute path without '..'")
        out["data_log_path"] = os.path.normpath(path)
    return out


def stream_filters(value: Any, where: str = "stream_filters") -> list[dict]:
    """The `stream_filters` list normalised (field_in default "data", field_data_type default "string", separator
    default ""); BadRequest naming the field for a bad entry, a repeated name, or a protocol field_index beyond
    PROTOCOL_FIELDS."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"'{where}' must be a list")
    out, names = [], set()
    for i, f in enumerate(value):
        w = f"{where}[{i}]."
        if not isinstance(f, dict):
            raise BadRequest(f"'{where}[{i}]' must be an object")
        name = _str(f, "name", w, max_len=255)
        if name in names:
            raise BadRequest(f"'{w}name' {name!r} is used twice")
        names.add(name)
        field_in = _str(f, "field_in", w, required=False, max_len=16) or "data"
        if field_in not in FIELD_IN:
            raise BadRequest(f"'{w}field_in' must be protocol or data")
        dtype = _str(f, "field_data_type", w, required=False, max_len=16) or "string"
        if dtype not in FIELD_TYPES:
            raise BadRequest(f"'{w}field_data_type' must be int, string or bytes")
        index = v.integer(f, "field_index", where=w, minimum=0, maximum=10_000)
        if field_in == "protocol" and index >= len(PROTOCOL_FIELDS):
            raise BadRequest(f"'{w}field_index' {index} is not a protocol field (0-{len(PROTOCOL_FIELDS) - 1}: "
                             f"{', '.join(PROTOCOL_FIELDS)})")
        raw = f.get("field_data_value")
        if raw is None or isinstance(raw, (dict, list, bool)):
            raise BadRequest(f"'{w}field_data_value' is required and must be a string or a number")
        value_s = str(raw)
        if dtype == "int":
            try:
                int(value_s)
            except ValueError:
                raise BadRequest(f"'{w}field_data_value' must be an integer for field_data_type int") from None
        sep = f.get("field_separator", "")
        if sep is None:
            sep = ""
        if not isinstance(sep, str) or len(sep) > 16:
            raise BadRequest(f"'{w}field_separator' must be a string of at most 16 characters")
        out.append({"name": name, "field_index": index, "field_data_type": dtype, "field_data_value": value_s,
                    "field_separator": sep, "field_in": field_in})
    return out


def route_entries(value: Any, filters: list[dict], streamtos: dict[int, dict], where: str = "route") -> list[dict]:
    """The `route` list; `streamtos` maps every existing stream_to_id to its document (to check references)."""
    if not isinstance(value, list) or not value:
        raise BadRequest(f"'{where}' is required and must be a non-empty list")
    names = {f["name"] for f in filters}
    out = []
    for i, e in enumerate(value):
        w = f"{where}[{i}]."
        if not isinstance(e, dict):
            raise BadRequest(f"'{where}[{i}]' must be an object")
        name = _str(e, "name", w, required=False, max_len=255) or f"route{i}"
        st = _obj(e.get("stream_to"), f"{w}stream_to")
        sw = f"{w}stream_to."
        sid = v.integer(st, "stream_to_id", where=sw, minimum=1)
        doc = streamtos.get(sid)
        if doc is None:
            raise BadRequest(f"'{sw}stream_to_id' {sid} does not exist (add it with add_streamto first)")
        mode = doc["stream_to"]["report_mode"]
        if "pulsar" in st:
            raise BadRequest(f"'{sw}pulsar' is not supported by this GSE; use kafka, redis or file")
        target: dict = {"stream_to_id": sid}
        if mode == "kafka":
            k = _obj(st.get("kafka"), f"{sw}kafka")
            kw = f"{sw}kafka."
            topic = _str(k, "topic_name", kw, max_len=249)
            if not re.match(r"^[A-Za-z0-9._\-]+$", topic):
                raise BadRequest(f"'{kw}topic_name' may hold only letters, digits, '.', '_' and '-'")
            target["kafka"] = {"topic_name": topic,
                               "partition": v.integer(k, "partition", where=kw, required=False, default=None,
                                                      minimum=0, maximum=1_000_000),
                               "data_set": _str(k, "data_set", kw, required=False, max_len=255),
                               "biz_id": v.integer(k, "biz_id", where=kw, required=False, default=0)}
        elif mode == "redis":
            r = _obj(st.get("redis"), f"{sw}redis")
            rw = f"{sw}redis."
            dtype = _str(r, "data_type", rw, required=False, max_len=16) or "pubsub"
            if dtype not in REDIS_TYPES:
                raise BadRequest(f"'{rw}data_type' must be pubsub, list or stream")
            target["redis"] = {"channel_name": _str(r, "channel_name", rw, max_len=1024), "data_type": dtype,
                               "data_set": _str(r, "data_set", rw, required=False, max_len=255),
                               "biz_id": v.integer(r, "biz_id", where=rw, required=False, default=0)}
        else:
            fobj = _obj(st.get("file"), f"{sw}file", required=False)
            fname = _str(fobj, "file_name", f"{sw}file.", required=False, max_len=255)
            if fname and (not _FILE_NAME.match(fname) or fname in (".", "..")):
                raise BadRequest(f"'{sw}file.file_name' must be a plain file name (letters, digits, '.', '_', '-')")
            target["file"] = {"file_name": fname}
        for key in ("filter_name_and", "filter_name_or"):
            fl = e.get(key) or []
            if not isinstance(fl, list) or not all(isinstance(x, str) for x in fl):
                raise BadRequest(f"'{w}{key}' must be a list of filter names")
            for j, fname in enumerate(fl):
                if fname not in names:
                    raise BadRequest(f"'{w}{key}[{j}]' names filter {fname!r}, which is not in stream_filters")
        out.append({"name": name, "stream_to": target, "filter_name_and": list(e.get("filter_name_and") or []),
                    "filter_name_or": list(e.get("filter_name_or") or [])})
    return out


def labels_match(doc_label: dict, wanted: dict) -> bool:
    """Whether a stored document's label has every key of `wanted` with the same value (compared as text): the label
    filter of query_streamto and query_route."""
    return all(str(doc_label.get(k)) == str(v) for k, v in wanted.items())
