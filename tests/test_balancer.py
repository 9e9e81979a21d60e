"""The balancer on its own: redirect and shed decisions from a ZooKeeper view, siblings never targets."""

from __future__ import annotations

from gse.taskserver.balancer import Balancer

ME = "10.0.0.1:48668"


def view(**nodes: tuple[str, int]) -> dict[str, dict]:
    return {nid: {"agent_address": addr, "load": load, "area": 0} for nid, (addr, load) in nodes.items()}


def balancer(node_id: str = "a-w0", address: str = ME) -> Balancer:
    return Balancer(node_id, 0, slack=1, ratio=0.0, agent_address=address)


def test_balancer_redirects_to_a_less_loaded_peer():
    b = balancer("a", "10.0.0.1:48668")
    b.on_view(view(a=("10.0.0.1:48668", 100), b=("10.0.0.2:48668", 10)))
    assert b.redirect_target(0, 100) == "10.0.0.2:48668"
    assert b.redirect_target(1, 100) is None                # another area


def test_balancer_never_redirects_to_a_sibling_worker():
    b = balancer()
    b.on_view(view(**{"a-w0": (ME, 500), "a-w1": (ME, 0), "a-w2": (ME, 3)}))
    assert b.siblings == {"a-w1": 0, "a-w2": 3} and b.peers == {}
    assert b.redirect_target(0, 500) is None
    assert b.shed_plan(500, 1000) == []


def test_balancer_sheds_to_other_machines_only():
    b = balancer()
    b.on_view(view(**{"a-w0": (ME, 300), "a-w1": (ME, 0), "b": ("10.0.0.2:48668", 0)}))
    assert b.redirect_target(0, 300) == "10.0.0.2:48668"
    plan = b.shed_plan(300, 1000)
    assert [address for address, _ in plan] == ["10.0.0.2:48668"]


def test_balancer_counts_siblings_in_the_average():
    """Two workers of 100 and a fresh peer: each worker sheds down to a third of the 200, not to half of
    its own pair with the peer (which would give the peer 100 and start a flow back)."""
    b = balancer()
    b.on_view(view(**{"a-w0": (ME, 100), "a-w1": (ME, 100), "b": ("10.0.0.2:48668", 0)}))
    ((address, n),) = b.shed_plan(100, 1000)
    assert address == "10.0.0.2:48668" and 30 <= n <= 34


def test_balancer_without_an_address_knows_no_siblings():
    b = Balancer("a", 0, slack=1, ratio=0.0)
    b.on_view(view(a=("", 100), b=("", 0), c=("10.0.0.3:48668", 0)))
    assert b.siblings == {}
    assert b.redirect_target(0, 100) == "10.0.0.3:48668"   # a peer without an address is never a target
