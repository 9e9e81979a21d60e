"""Typed, strict configuration: defaults, then the YAML file, then overrides, then validation.

Every daemon describes its configuration as frozen dataclasses. `load_config` builds them from a YAML
mapping; a key the dataclass does not know is an error naming the full dotted path, and a value of the
wrong type is an error naming the key and the type it wanted. Overrides (`--set a.b=value` flags and
`GSE_<DAEMON>__A__B=value` environment variables) go through the same path and fail just as loudly.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .address import split_host_port


class ConfigError(ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = args if args else (Any, Any)
        return types.MappingProxyType(
            {_convert(k, key_tp, f"{path}.<key>"): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def build(cls: type, data: Mapping[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown configuration key '{where}{unknown[0]}'")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], f"{path}.{name}" if path else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a required field missing
        raise ConfigError(f"{path or '<root>'}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"{path + ': ' if path else ''}{exc}") from None
    return obj


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ('a.b', parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{key}': {exc}") from None
    return key, value


def env_overrides(prefix: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Environment overrides `GSE_<PREFIX>__A__B=v` as `a.b=v` strings, in sorted order."""
    environ = os.environ if environ is None else environ
    head = f"GSE_{prefix.upper()}__"
    out = []
    for name in sorted(environ):
        if name.startswith(head):
            key = ".".join(p.lower() for p in name[len(head):].split("__"))
            out.append(f"{key}={environ[name]}")
    return out


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: list[str] | tuple = (),
                env_prefix: str | None = None, environ: Mapping[str, str] | None = None) -> Any:
    """Defaults, then the YAML file at `path`, then environment overrides, then `overrides`."""
    tree: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    extra = env_overrides(env_prefix, environ) if env_prefix else []
    for item in [*extra, *overrides]:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    return build(cls, tree)


def to_dict(obj: Any) -> Any:
    """A config dataclass back to plain data (for writing sample configs and cluster files)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---- sections every daemon shares ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TLSConfig:
    """Mutual TLS material. Every gRPC listener and channel uses it; there is no plaintext mode."""
    ca: str = ""
    cert: str = ""
    key: str = ""
    # Name to verify in peer server certificates instead of the dialled host ("" = the dialled host).
    server_name: str = ""

    def require(self) -> None:
        """ConfigError unless ca, cert and key are all set (every server daemon needs them)."""
        for name in ("ca", "cert", "key"):
            if not getattr(self, name):
                raise ConfigError(f"tls.{name} is required (make certificates with 'gse certs init')")


def check_addresses(key: str, addresses: Iterable[str], default_port: int | None = None) -> None:
    """Every entry of config key `key` is host:port (gse.common.address); ConfigError naming the key and the
    entry otherwise."""
    for a in addresses:
        try:
            split_host_port(a, default_port)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class ZooKeeperConfig:
    """The ZooKeeper ensemble every daemon registers in and watches (DESIGN.md, "Cluster mechanics")."""
    hosts: str = "127.0.0.1:2181"      # host[:port],host[:port],... (kazoo's form; the port defaults to 2181)
    root: str = "/gse"
    session_timeout_s: float = 10.0

    def validate(self) -> None:
        """ConfigError unless every host is host[:port] and root is an absolute path without a trailing slash."""
        check_addresses("zookeeper.hosts", self.hosts.split(","), default_port=2181)
        if not self.root.startswith("/") or self.root.endswith("/") and self.root != "/":
            raise ConfigError(f"zookeeper.root '{self.root}' must be an absolute path without a trailing slash")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Log level and line format (gse.common.logs)."""
    level: str = "info"
    format: str = "json"   # json | text

    def validate(self) -> None:
        """ConfigError unless level is debug/info/warning/error and format json/text."""
        if self.level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log.level '{self.level}' is not one of debug, info, warning, error")
        if self.format not in ("json", "text"):
            raise ConfigError(f"log.format '{self.format}' is not json or text")


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """The operations HTTP endpoint: /metrics (Prometheus) and /healthz."""
    host: str = "127.0.0.1"
    port: int = 0          # 0 = any free port (it is written to the ZooKeeper node)


@dataclasses.dataclass(frozen=True)
class DbProxyClientConfig:
    """How a daemon reaches dbproxy: fixed `addresses` (`host:port`), or none to follow the dbproxies registered in
    ZooKeeper; `timeout_s` is the deadline of one batch call in seconds."""
    addresses: tuple[str, ...] = ()     # empty = the dbproxies registered in ZooKeeper
    timeout_s: float = 5.0

    def validate(self) -> None:
        """ConfigError unless every address is host:port."""
        check_addresses("dbproxy.addresses", self.addresses)
