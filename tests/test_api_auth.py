"""API auth is decided before the body is read: header credentials before any of it, body credentials only
within max_auth_body_bytes; secrets compare in constant time (the function is checked for its answers)."""

from __future__ import annotations

import json
import socket
import time

from conftest import ApiClient

from gse.apiserver.app import secret_matches

STATE = "/api/v2/cluster/list_agent_state"


def _raw_http(url: str, head: dict, body: bytes = b"", read_timeout: float = 5.0) -> tuple[int, dict, float]:
    """Send the request line and headers (and `body`, possibly less than Content-Length says); return the
    status, the JSON answer and how long the answer took."""
    host, port = url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        lines = [f"POST {STATE} HTTP/1.1", f"Host: {host}", "Connection: close",
                 *(f"{k}: {v}" for k, v in head.items())]
        t0 = time.monotonic()
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - t0
    head_raw, payload = data.split(b"\r\n\r\n", 1)
    return int(head_raw.split()[1]), json.loads(payload), took


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def test_header_credentials_are_checked_before_the_body_is_read(cluster):
    url = cluster.api_url()
    wrong = json.dumps({"bk_app_code": cluster.app_code, "bk_app_secret": "wrong"})
    # The body announced is 50 MB and never sent: the answer comes without waiting for it.
    status, payload, took = _raw_http(url, {"X-Bkapi-Authorization": wrong, "Content-Length": "50000000",
                                            "Content-Type": "application/json"})
    assert status == 401 and payload["code"] == 1000401 and took < 3


def test_body_credentials_are_read_only_within_the_bound(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    c.start_apiserver(max_auth_body_bytes=4096)
    api = ApiClient(c.api_url(), c.app_code, c.app_secret)
    creds = {"bk_app_code": c.app_code, "bk_app_secret": c.app_secret}
    small = json.dumps({**creds, "agent_id_list": ["a" * 32]}).encode()
    status, payload = api.raw(STATE, small, {"Content-Type": "application/json"})
    assert status == 200 and payload["code"] in (0, 1011003)
    # Over the bound with credentials only in the body: refused before it is read (announced, never sent).
    status, payload, took = _raw_http(c.api_url(), {"Content-Length": "50000000"})
    assert status == 401 and "X-Bkapi-Authorization" in payload["message"] and took < 3
    # ... and when it is really sent (chunked, no length announced): refused once the bound is passed.
    big = json.dumps({**creds, "agent_id_list": ["a" * 32] * 400}).encode()
    assert len(big) > 4096
    chunked = b"".join(f"{len(big[i:i + 1000]):x}\r\n".encode() + big[i:i + 1000] + b"\r\n"
                       for i in range(0, len(big), 1000)) + b"0\r\n\r\n"
    status, payload, _ = _raw_http(c.api_url(), {"Transfer-Encoding": "chunked"}, chunked)
    assert status == 401 and payload["code"] == 1000401
    # The same body with the header: taken (the full max_body_bytes applies once authenticated).
    status, payload = api.raw(STATE, big, {"Content-Type": "application/json", **api.auth_header()})
    assert status == 200 and payload["code"] in (0, 1011003)


def test_secret_comparison():
    assert secret_matches("s3cret", "s3cret")
    assert not secret_matches("s3cret", "s3cre")
    assert not secret_matches("s3cret", "s3cret" + "x" * 1000)
    assert not secret_matches(None, "anything")
    assert not secret_matches("", "x") and secret_matches("", "")
