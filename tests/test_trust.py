"""An agent is who its certificate says: per-agent identity, enrollment with one-time tokens, revocation
applied live, and the shared-certificate mode behind its cluster switch. Real daemons, real TLS, real
ZooKeeper; links are opened with the agent's own transport (gse/common/framelink.py)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import urllib.request

import grpc
import pytest
from conftest import FrameInbox, api_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gse.cli import main as gse
from gse.common import framelink, rpc
from gse.common.address import split_host_port
from gse.common.enrollment import TOKENS
from gse.common.tls import TLSMaterial, make_csr, new_key
from gse.devcluster import wait_for
from gse.pb import agent_pb2 as pb


async def _exchange(address: str, tls: TLSMaterial | None, frame: pb.AgentFrame, local_ip: str = "",
                    keep: bool = False):
    """Open a link (no client certificate when `tls` has none), send one frame, return (first answer or None,
    link, inbox). Unless `keep`, waits for the link to end."""
    host, port = split_host_port(address)
    ctx = framelink.client_context(tls, with_certificate=bool(tls.cert))
    inbox = FrameInbox()
    link = await framelink.dial(ctx, host, port, inbox, server_hostname="gse-server", local_ip=local_ip)
    link.write(frame.SerializeToString())
    async with asyncio.timeout(10):
        while not inbox.frames and not inbox.lost.is_set():
            await asyncio.sleep(0.01)
        if not keep:
            await inbox.lost.wait()
    return (inbox.frames[0] if inbox.frames else None), link, inbox


def _metrics(proc) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{proc.info['metrics_port']}/metrics", timeout=5).read().decode()


def _hello(agent_id: str, ip: str = "127.0.0.9") -> pb.AgentFrame:
    return pb.AgentFrame(hello=pb.AgentHello(agent_id=agent_id, ip=ip, hostname="t", version="test"))


def _agent_tls(c, index: int) -> TLSMaterial:
    """The TLS material of dev agent `index` (its own certificate, in its directory)."""
    d = c.base / "agents" / f"agent-{index}" / "tls"
    return TLSMaterial((c.certs_dir / "ca.crt").read_bytes(), (d / "agent.crt").read_bytes(),
                       (d / "agent.key").read_bytes())


def _zk_flags(c) -> list[str]:
    return ["--zookeeper", c.zookeeper, "--root", c.zk_root]


def test_agent_enrolls_with_a_token_and_attaches_with_its_own_certificate(make_cluster):
    c = make_cluster(agent_identity="enroll")
    c.start_dbproxy()
    c.start_taskserver()
    c.start_apiserver()
    agent = c.start_agent()
    aid = agent.info["bk_agent_id"]
    api_for(c).wait_alive([aid])
    d = c.base / "agents" / "agent-1"
    ident = _agent_tls(c, 1).identity()
    assert (ident.role, ident.agent_id) == ("agent", aid)
    assert stat.S_IMODE(os.stat(d / "tls" / "agent.key").st_mode) == 0o600     # made on the host, private
    assert not (d / "enroll.token").exists()                                    # used: removed
    assert "enrolled" in agent.log_path.read_text()
    assert "gse_taskserver_enrolled_total 1.0" in _metrics(c.taskservers[0])
    # The token is marked used in ZooKeeper (only its hash is stored there).
    from kazoo.client import KazooClient
    zk = KazooClient(hosts=c.zookeeper)
    zk.start(timeout=10)
    try:
        nodes = zk.get_children(f"{c.zk_root}/{TOKENS}")
        recs = [json.loads(zk.get(f"{c.zk_root}/{TOKENS}/{n}")[0]) for n in nodes]
        assert [r["used_by"] for r in recs] == [aid]
        assert json.loads(zk.get(f"{c.zk_root}/enroll/agents/{aid}")[0])["serial"] == ident.serial
    finally:
        zk.stop()
        zk.close()
    # Restarted, it keeps its certificate and identity: no second enrollment.
    agent = c.restart(agent)
    api_for(c).wait_alive([aid])
    assert agent.log_path.read_text().count("agent enrolled") == 1


def test_enrollment_refuses_bad_used_expired_and_foreign_tokens(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver()
    address = ts.info["address"]
    no_cert = TLSMaterial((c.certs_dir / "ca.crt").read_bytes(), b"", b"")
    key = new_key()
    good, expired, bound = c.enroll_tokens(1)[0], c.enroll_tokens(1, ttl_s=-1)[0], \
        c.enroll_tokens(agent_ids=["b" * 32])[0]

    def enroll(token: str, agent_id: str = "a" * 32, csr: bytes | None = None) -> pb.ServerFrame:
        frame = pb.AgentFrame(enroll=pb.Enroll(token=token, agent_id=agent_id,
                                               csr=csr if csr is not None else make_csr(key, agent_id)))
        return asyncio.run(_exchange(address, no_cert, frame))[0]

    cases = [
        ("gse1_" + "x" * 43, "token_unknown", "unknown"),
        ("not-a-token", "token_unknown", "not one"),
        (expired, "token_expired", "expired"),
        (bound, "token_agent", "for agent " + "b" * 32),
    ]
    for token, code, words in cases:
        answer = enroll(token)
        assert answer.WhichOneof("body") == "refused" and answer.refused.code == code, (token, answer)
        assert words in answer.refused.reason
    # A request whose CN is another id, or that is no CSR at all, burns no token.
    other = make_csr(key, "c" * 32)
    assert enroll(good, csr=other).refused.code == "bad_request"
    assert enroll(good, csr=b"junk").refused.code == "bad_request"
    answer = enroll(good)
    assert answer.WhichOneof("body") == "enrolled"
    cert_id = TLSMaterial(b"", answer.enrolled.certificate, b"").identity()
    assert (cert_id.role, cert_id.agent_id) == ("agent", "a" * 32)
    used = enroll(good, agent_id="d" * 32)
    assert used.refused.code == "token_used" and "already used" in used.refused.reason
    # The agent that used it, asking again with the same key (its answer lost), gets its certificate again;
    # the same id with another key does not.
    assert enroll(good).WhichOneof("body") == "enrolled"
    assert enroll(good, csr=make_csr(new_key(), "a" * 32)).refused.code == "token_used"
    # An enrolled id enrolls again only with a token made for it.
    again = enroll(c.enroll_tokens(1)[0])
    assert again.refused.code == "enrolled" and "--agent-id" in again.refused.reason
    assert enroll(c.enroll_tokens(agent_ids=["a" * 32])[0]).WhichOneof("body") == "enrolled"
    # Without a certificate nothing but an Enroll frame is answered.
    answer = asyncio.run(_exchange(address, no_cert, _hello("a" * 32)))[0]
    assert answer.refused.code == "role" and "certificate is required" in answer.refused.reason
    m = _metrics(ts)
    for code in ("token_unknown", "token_expired", "token_agent", "token_used", "bad_request", "enrolled"):
        assert f'gse_taskserver_enroll_refused_total{{code="{code}"}}' in m, code
    assert "gse_taskserver_enrolled_total 3.0" in m


def test_one_token_is_accepted_once_even_by_two_servers_at_once(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    servers = [c.start_taskserver(), c.start_taskserver()]
    no_cert = TLSMaterial((c.certs_dir / "ca.crt").read_bytes(), b"", b"")
    for _ in range(3):
        (token,) = c.enroll_tokens(1)
        ids = [os.urandom(16).hex() for _ in range(6)]

        async def race():
            frames = [pb.AgentFrame(enroll=pb.Enroll(token=token, agent_id=i, csr=make_csr(new_key(), i)))
                      for i in ids]
            return await asyncio.gather(*[_exchange(servers[n % 2].info["address"], no_cert, f)
                                          for n, f in enumerate(frames)])
        answers = [a[0].WhichOneof("body") for a in asyncio.run(race())]
        assert answers.count("enrolled") == 1, answers


def test_hello_naming_another_agent_is_refused(make_cluster, tmp_path):
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver()
    c.ca.issue_files(tmp_path, "a", "agent", agent_id="a" * 32)
    tls = TLSMaterial((c.certs_dir / "ca.crt").read_bytes(), (tmp_path / "a.crt").read_bytes(),
                      (tmp_path / "a.key").read_bytes())
    answer = asyncio.run(_exchange(ts.info["address"], tls, _hello("b" * 32)))[0]
    assert answer.refused.code == "identity"
    assert answer.refused.reason == f"the hello names agent {'b' * 32} but the certificate is agent {'a' * 32}"
    answer, link, _ = asyncio.run(_exchange(ts.info["address"], tls, _hello("a" * 32), keep=True))
    assert answer.WhichOneof("body") == "welcome"
    assert 'gse_taskserver_agent_refused_total{reason="identity"} 1.0' in _metrics(ts)
    # The shared certificate (naming no agent) is refused while shared-certificate mode is off.
    shared = TLSMaterial.from_dir(c.certs_dir, "agent")
    answer = asyncio.run(_exchange(ts.info["address"], shared, _hello("b" * 32)))[0]
    assert answer.refused.code == "shared_off"


def test_revoked_agent_is_cut_live_and_refused_everywhere(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver()
    fs = c.start_fileserver()
    c.start_apiserver()
    api = api_for(c)
    victim, other = c.start_agent(), c.start_agent()
    vid, oid = victim.info["bk_agent_id"], other.info["bk_agent_id"]
    api.wait_alive([vid, oid])
    t0 = time.monotonic()
    assert gse(["certs", "revoke", vid, "--reason", "host decommissioned", *_zk_flags(c)]) == 0
    api.wait_alive([vid], timeout=10, alive=False)
    assert time.monotonic() - t0 < 5
    wait_for(lambda: f"agent {vid} is revoked" in victim.log_path.read_text(), 10, "the agent told why")
    # It keeps trying and keeps being refused; the other agent is untouched.
    time.sleep(2)
    assert api.states([vid, oid])[oid]["status_code"] == 2
    assert api.states([vid]).get(vid, {}).get("status_code") != 2
    assert 'gse_taskserver_agent_refused_total{reason="revoked"}' in _metrics(ts)
    # The file server refuses its certificate too (the same list, the same check).
    tls = _agent_tls(c, 1)

    async def health():
        ch = rpc.make_channel(tls, fs.info["address"])
        try:
            return await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        finally:
            await ch.close()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(health())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()
    # Lifted: it comes back by itself.
    assert gse(["certs", "revoke", vid, "--lift", *_zk_flags(c)]) == 0
    api.wait_alive([vid], timeout=20)


def test_shared_certificate_mode_refuses_takeovers_and_counts_them(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    ts1, ts2 = c.start_taskserver(), c.start_taskserver()
    shared = TLSMaterial.from_dir(c.certs_dir, "agent")
    aid = "5a" * 16
    assert asyncio.run(_exchange(ts1.info["address"], shared, _hello(aid)))[0].refused.code == "shared_off"
    assert gse(["certs", "shared-mode", "on", *_zk_flags(c)]) == 0

    async def scenario():
        async def attach(ts, ip):
            return await _exchange(ts.info["address"], shared, _hello(aid, ip), local_ip=ip, keep=True)

        async def until_welcome():
            while True:
                first, link, inbox = await attach(ts1, "127.0.0.21")
                if first.WhichOneof("body") == "welcome":
                    return link, inbox
                await asyncio.sleep(0.2)        # the switch is applied live: within moments
        link1, inbox1 = await asyncio.wait_for(until_welcome(), 15)
        # Another address claiming the attached id: refused, the first link untouched.
        first, _, _ = await attach(ts1, "127.0.0.22")
        assert first.refused.code == "takeover", first
        assert not link1.closed
        # ... on the other task server too (the session record says who holds it).
        async with asyncio.timeout(15):
            while True:
                first, link, _ = await attach(ts2, "127.0.0.22")
                if first.WhichOneof("body") == "refused":
                    break
                link.close()
                await asyncio.sleep(0.3)       # the record is written in the next batch
        assert first.refused.code == "takeover" and "another address" in first.refused.reason
        # The same address reconnecting replaces the old link.
        first, link3, _ = await attach(ts1, "127.0.0.21")
        assert first.WhichOneof("body") == "welcome"
        await asyncio.wait_for(inbox1.lost.wait(), 5)
        link3.close()

    asyncio.run(scenario())
    for ts in (ts1, ts2):
        assert 'gse_taskserver_agent_refused_total{reason="takeover"}' in _metrics(ts)
    assert gse(["certs", "shared-mode", "off", *_zk_flags(c)]) == 0
