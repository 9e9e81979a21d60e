"""Roles: every certificate names one, every service checks it in one place (gse/common/roles.py).

Real daemons over real mutual TLS: a host's agent certificate reaches neither dbproxy, nor the task
servers' internal task API, nor file management; an operator certificate does not reach what only servers
may call; the refusal is PERMISSION_DENIED naming the role required and the role shown.
"""

from __future__ import annotations

import asyncio
import os
import stat

import grpc
import pytest
from conftest import FrameInbox
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gse.common import framelink, roles, rpc
from gse.common.address import split_host_port
from gse.common.safefile import write_private
from gse.common.tls import CA, CertError, TLSMaterial, init_certs
from gse.pb import agent_pb2 as apb
from gse.pb import dbproxy_pb2 as dpb
from gse.pb import dbproxy_pb2_grpc as dpb_grpc
from gse.pb import file_pb2 as fpb
from gse.pb import file_pb2_grpc as fpb_grpc
from gse.pb import taskserver_pb2 as tpb
from gse.pb import taskserver_pb2_grpc as tpb_grpc


def test_every_certificate_names_its_role(tmp_path):
    d = init_certs(tmp_path / "c", shared_agent=True)
    for name, role in (("server", "server"), ("api", "api"), ("operator", "operator"), ("agent", "agent")):
        ident = TLSMaterial.from_dir(d, name).identity()
        assert (ident.role, ident.agent_id) == (role, ""), name
    ca = CA.load(d / "ca.crt", d / "ca.key")
    ca.issue_files(d, "a1", "agent", agent_id="0123abcd")
    assert TLSMaterial.from_dir(d, "a1").identity() == roles.Identity("agent", "0123abcd",
                                                                      TLSMaterial.from_dir(d, "a1").identity().serial)
    with pytest.raises(CertError, match="only agent and proxy"):
        ca.issue_files(d, "x", "server", agent_id="0123abcd")
    with pytest.raises(CertError, match="role 'root'"):
        ca.issue_files(d, "x", "root")


def test_access_table_is_default_deny():
    assert roles.allowed_roles(roles.ACCESS, "/gse.pb.DbProxy/Execute") == {"server", "api"}
    assert roles.allowed_roles(roles.ACCESS, "/gse.pb.FileService/CreateTransfer") == {"server"}
    assert roles.allowed_roles(roles.ACCESS, "/gse.pb.FileService/Fetch") == {"agent", "proxy"}
    assert roles.allowed_roles(roles.ACCESS, "/gse.pb.NewService/Anything") == frozenset()
    assert roles.allowed_roles(roles.ACCESS, "/grpc.health.v1.Health/Check") == roles.ANY
    # A certificate naming two roles names none.
    assert roles.from_uris(["gse://role/agent", "gse://role/server"]).role == ""


def test_keys_are_private_from_their_first_byte(tmp_path):
    old = os.umask(0)           # even a careless umask: the mode is given at open
    try:
        d = init_certs(tmp_path / "c", shared_agent=True)
    finally:
        os.umask(old)
    for name in ("ca", "server", "api", "operator", "agent"):
        assert stat.S_IMODE(os.stat(d / f"{name}.key").st_mode) == 0o600, name
        assert stat.S_IMODE(os.stat(d / f"{name}.crt").st_mode) == 0o644, name
    # A symlink planted where the file goes is replaced, never written through.
    marker = tmp_path / "marker"
    marker.write_text("untouched")
    link = tmp_path / "secret.key"
    link.symlink_to(marker)
    write_private(link, b"KEY")
    assert marker.read_text() == "untouched"
    assert not link.is_symlink() and link.read_bytes() == b"KEY"
    assert stat.S_IMODE(os.stat(link).st_mode) == 0o600


def _status(coro_fn):
    """Run an async call; return (code, details) of its failure or (OK, "")."""
    try:
        asyncio.run(coro_fn())
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def _call(tls, address, stub_cls, method, request):
    ch = rpc.make_channel(tls, address)
    try:
        return await getattr(stub_cls(ch), method)(request, timeout=10)
    finally:
        await ch.close()


def test_agent_and_operator_certificates_refused_by_internal_services(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    c.start_taskserver()
    fs = c.start_fileserver()
    d = c.certs_dir
    agent, operator = TLSMaterial.from_dir(d, "agent"), TLSMaterial.from_dir(d, "operator")
    server, api = TLSMaterial.from_dir(d, "server"), TLSMaterial.from_dir(d, "api")
    db_addr = c.dbproxies[0].info["address"]
    task_addr = _task_address(c)
    fs_addr = fs.info["address"]
    # A harmless write an agent must never be able to make.
    put = dpb.BatchRequest(ops=[dpb.Op(kind=dpb.Op.Kind.Value("SET"), key="roles-probe", value=b"x")])
    dispatch = tpb.DispatchRequest(frame=b"", agent_ids=[])
    create = fpb.CreateTransferRequest(transfer_id="roles-probe", members=["a"])

    cases = [
        (agent, db_addr, dpb_grpc.DbProxyStub, "Execute", put, "/gse.pb.DbProxy/Execute", "api or server", "agent"),
        (agent, task_addr, tpb_grpc.TaskServiceStub, "Dispatch", dispatch, "/gse.pb.TaskService/Dispatch",
         "api or server", "agent"),
        (agent, fs_addr, fpb_grpc.FileServiceStub, "CreateTransfer", create, "/gse.pb.FileService/CreateTransfer",
         "server", "agent"),
        (operator, fs_addr, fpb_grpc.FileServiceStub, "CreateTransfer", create,
         "/gse.pb.FileService/CreateTransfer", "server", "operator"),
        (operator, db_addr, dpb_grpc.DbProxyStub, "Execute", put, "/gse.pb.DbProxy/Execute", "api or server",
         "operator"),
        (api, fs_addr, fpb_grpc.FileServiceStub, "CreateTransfer", create, "/gse.pb.FileService/CreateTransfer",
         "server", "api"),
    ]
    for tls, addr, stub, method, req, full, need, shown in cases:
        code, details = _status(lambda: _call(tls, addr, stub, method, req))
        assert code == grpc.StatusCode.PERMISSION_DENIED, (full, shown, code, details)
        assert f"{full} requires a certificate of role {need}; the peer showed {shown}" == details

    # Nothing was written by the refused calls; the roles that may, can.
    got = asyncio.run(_call(server, db_addr, dpb_grpc.DbProxyStub, "Execute",
                            dpb.BatchRequest(ops=[dpb.Op(kind=dpb.Op.Kind.Value("GET"), key="roles-probe")])))
    assert not got.results[0].found
    assert _status(lambda: _call(api, db_addr, dpb_grpc.DbProxyStub, "Execute", put))[0] == grpc.StatusCode.OK
    assert _status(lambda: _call(api, task_addr, tpb_grpc.TaskServiceStub, "Dispatch", dispatch))[0] \
        == grpc.StatusCode.OK
    # Health answers every role.
    for tls in (agent, operator):
        reply = asyncio.run(_call(tls, fs_addr, health_pb2_grpc.HealthStub, "Check", health_pb2.HealthCheckRequest()))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    import urllib.request
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{c.dbproxies[0].info['metrics_port']}/metrics",
                                     timeout=5).read().decode()
    assert 'gse_role_refused_total{method="/gse.pb.DbProxy/Execute",role="agent"} 1.0' in metrics


def _task_address(c) -> str:
    from gse.common.config import ZooKeeperConfig
    from gse.common.discovery import Discovery

    async def read():
        disc = Discovery(ZooKeeperConfig(hosts=c.zookeeper, root=c.zk_root))
        await disc.start()
        try:
            view = await disc.watch_service("taskserver")
        finally:
            await disc.stop()
        return next(iter(view.values()))["task_address"]
    return asyncio.run(read())


def test_agent_port_takes_only_agent_and_proxy_certificates(make_cluster):
    c = make_cluster()
    c.start_dbproxy()
    ts = c.start_taskserver()
    host, port = split_host_port(ts.info["address"])

    async def hello(name: str) -> list:
        inbox = FrameInbox()
        tls = TLSMaterial.from_dir(c.certs_dir, name)
        link = await framelink.dial(framelink.client_context(tls), host, int(port), inbox, server_hostname=host)
        link.write(apb.AgentFrame(hello=apb.AgentHello(agent_id="a" * 32, ip="127.0.0.9")).SerializeToString())
        await asyncio.wait_for(inbox.lost.wait(), 10)
        return inbox.frames

    for name in ("operator", "api", "server"):
        frames = asyncio.run(hello(name))
        assert [f.WhichOneof("body") for f in frames] == ["refused"], name
        assert frames[0].refused.reason == \
            f"the agent port requires a certificate of role agent or proxy; the peer showed {name}"
