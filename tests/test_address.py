"""The one address parser (gse/common/address.py) and the config keys that use it. Unit tests: no daemons."""

import pytest

from gse.common.address import join_host_port, parse_host_id, split_host_port
from gse.common.config import ConfigError, build


@pytest.mark.parametrize("text,expected", [
    ("10.0.0.1:48668", ("10.0.0.1", 48668)),
    ("gse-task-1.example:58625", ("gse-task-1.example", 58625)),
    ("[::1]:48668", ("::1", 48668)),
    ("[fe80::1]:1", ("fe80::1", 1)),
    ("  10.0.0.1:65535 ", ("10.0.0.1", 65535)),
])
def test_split_host_port_reads_hosts_names_and_bracketed_ipv6(text, expected):
    assert split_host_port(text) == expected
    assert split_host_port(join_host_port(*expected)) == expected


@pytest.mark.parametrize("text", ["10.0.0.1", "10.0.0.1:", ":48668", "10.0.0.1:0", "10.0.0.1:65536",
                                  "10.0.0.1:-1", "10.0.0.1:4866x", "10.0.0.1:\u00b2", "[::1]", "[::1]48668",
                                  "[::1:48668", "::1", ""])
def test_split_host_port_refuses_what_is_not_an_address_and_names_it(text):
    with pytest.raises(ValueError) as e:
        split_host_port(text)
    assert repr(text.strip()) in str(e.value)


def test_split_host_port_default_port_and_listen_port_zero():
    assert split_host_port("zk1", 2181) == ("zk1", 2181)
    assert split_host_port("::1", 2181) == ("::1", 2181)
    assert split_host_port("[::1]", 2181) == ("::1", 2181)
    assert split_host_port("0.0.0.0:0", listen=True) == ("0.0.0.0", 0)
    with pytest.raises(ValueError):
        split_host_port("0.0.0.0:0")


def test_join_host_port_brackets_ipv6_only():
    assert join_host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert join_host_port("::1", 80) == "[::1]:80"
    assert join_host_port("[::1]", 80) == "[::1]:80"


def test_parse_host_id_is_cloud_colon_ip_or_none():
    assert parse_host_id("0:10.0.0.1") == (0, "10.0.0.1")
    assert parse_host_id("3:::1") == (3, "::1")
    assert parse_host_id("0123456789abcdef0123456789abcdef") is None
    assert parse_host_id("x:10.0.0.1") is None
    assert parse_host_id("0:not-an-ip") is None
    assert parse_host_id("10.0.0.1:80") is None


TLS = {"tls": {"ca": "ca.crt", "cert": "x.crt", "key": "x.key"}}


def _agent(**kw):
    from gse.agent.agent import AgentConfig
    return build(AgentConfig, {**TLS, **kw})


def test_config_address_errors_name_the_key():
    from gse.dbproxy.server import DbProxyConfig
    assert _agent(servers=["[::1]:48668", "ts:48668"]).servers == ("[::1]:48668", "ts:48668")
    with pytest.raises(ConfigError, match=r"^servers: '10.0.0.1' has no port"):
        _agent(servers=["10.0.0.1"])
    with pytest.raises(ConfigError, match=r"^data.servers: '10.0.0.1:x'"):
        _agent(data={"servers": ["10.0.0.1:x"]})
    with pytest.raises(ConfigError, match=r"^redis: '127.0.0.1:0'"):
        build(DbProxyConfig, {**TLS, "redis": ["127.0.0.1:0"], "replicas": 1})
    assert build(DbProxyConfig, {**TLS, "redis": ["127.0.0.1:6379", "[::1]:6380"], "replicas": 2,
                                 "zookeeper": {"hosts": "zk1,zk2:2182,[::1]:2181"}}).replicas == 2
    with pytest.raises(ConfigError, match=r"^zookeeper.hosts: ':2181' has no host"):
        build(DbProxyConfig, {**TLS, "zookeeper": {"hosts": "zk1,:2181"}})


def test_dbproxy_client_addresses_are_checked():
    from gse.taskserver.server import TaskServerConfig
    with pytest.raises(ConfigError, match=r"^dbproxy.addresses: 'dbp' has no port"):
        build(TaskServerConfig, {**TLS, "dbproxy": {"addresses": ["dbp"]}})
