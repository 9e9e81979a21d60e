"""Addresses, parsed in one place: `host:port` of daemons and `bk_cloud_id:ip` of agents.

`split_host_port("10.0.0.1:48668")` -> ("10.0.0.1", 48668); IPv6 in brackets (`[::1]:48668` -> ("::1",
48668)); `join_host_port` is the inverse. `parse_host_id("0:10.0.0.1")` -> (0, "10.0.0.1") is the old-style
agent id (spec §2).
"""

from __future__ import annotations

import ipaddress
import socket


def split_host_port(text: str, default_port: int | None = None, *, listen: bool = False) -> tuple[str, int]:
    """(host, port) of "host:port", "[v6]:port", or a bare host when `default_port` is given. `listen`: an
    address to bind, where port 0 means any free port. Raises ValueError naming the text when it is not an
    address (empty host, no port, port out of range)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        port_text = rest[1:] if rest.startswith(":") else ("" if not rest else None)
        if port_text is None:
            raise ValueError(f"{text!r} is not [host]:port")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:                       # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{text!r} has no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port (host:port)")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not (0 if listen else 1) <= int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be {0 if listen else 1}-65535")
    return host, int(port_text)


def join_host_port(host: str, port: int) -> str:
    """"host:port", with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


MAX_AGENT_ID = 64


def valid_agent_id(text: str) -> bool:
    """A bk_agent_id as agents make and the API accepts it: 1-64 printable characters without ':' or ' '
    (spec §2; ':' would be ambiguous with the "cloud:ip" form)."""
    return 0 < len(text) <= MAX_AGENT_ID and text.isprintable() and ":" not in text and " " not in text


def parse_host_id(text: str) -> tuple[int, str] | None:
    """`"{bk_cloud_id}:{ip}"` -> (cloud, ip); None when the text is not of that form (then it is a bk_agent_id)."""
    cloud, sep, ip = text.partition(":")
    if not sep or not cloud.isdigit():
        return None
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return None
    return int(cloud), ip


def route_ip(server: str) -> str:
    """The local address the kernel would use to reach `server` ("host:port" or a bare host; no packet is
    sent); "127.0.0.1" when there is no route."""
    try:
        host = split_host_port(server, 9)[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except (OSError, ValueError):
        return "127.0.0.1"
