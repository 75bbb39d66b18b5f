"""This machine's addresses as rendezvous needs them: which addresses only this machine
reaches, the MASTER_ADDR group rank 0 advertises given every member's address, and
whether a host name (resolving or not) is this machine. Name resolution is monkeypatched
wherever a name would otherwise be looked up: nothing is sent."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from elastic_runner.addresses import address_towards, is_loopback
from elastic_runner.rendezvous import network
from elastic_runner.rendezvous.network import is_local_address, reachable_address


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.1.1", True),  # Debian's "127.0.1.1 <hostname>"
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.1.1", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("node.localhost", True),
        ("10.0.0.1", False),
        ("192.0.2.2", False),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("fd00::2", False),
        ("node0", False),  # a name: each node resolves it for itself
        ("node0.example.org", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.fixture
def towards(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """address_towards(peer) answers 10.0.0.1 for any peer, and records the peers."""
    asked: list[str] = []

    def address_towards(host: str, port: int) -> str:
        asked.append(host)
        return "10.0.0.1"

    monkeypatch.setattr(network, "address_towards", address_towards)
    return asked


@pytest.mark.parametrize(
    ("own", "peers", "expected", "asked"),
    [
        ("127.0.0.1", [], "127.0.0.1", []),  # a single node
        ("127.0.0.1", ["127.0.0.1", "127.0.0.1"], "127.0.0.1", []),  # all on this machine
        ("127.0.1.1", ["::1", "localhost"], "127.0.1.1", []),
        ("10.0.0.7", ["10.0.0.2"], "10.0.0.7", []),  # already reachable
        ("10.0.0.7", ["127.0.0.1"], "10.0.0.7", []),  # a loopback peer changes nothing
        ("node0", ["10.0.0.2"], "node0", []),  # a name is the others' to resolve
        # the store's host, reaching its store over loopback, with nodes elsewhere:
        ("127.0.1.1", ["10.0.0.2"], "10.0.0.1", ["10.0.0.2"]),
        ("127.0.0.1", ["127.0.0.1", "10.0.0.3", "10.0.0.4"], "10.0.0.1", ["10.0.0.3"]),
        ("::1", ["fd00::3"], "10.0.0.1", ["fd00::3"]),
        ("127.0.0.1", ["node2"], "10.0.0.1", ["node2"]),
    ],
)
def test_reachable_address(
    towards: list[str], own: str, peers: list[str], expected: str, asked: list[str]
) -> None:
    assert reachable_address(own, peers) == expected
    assert towards == asked


def test_reachable_address_routes_for_real() -> None:
    # No packet is sent: a UDP socket's connect only picks the route.
    assert reachable_address("127.0.0.1", ["127.0.0.2"]) == "127.0.0.1"
    assert is_loopback(address_towards("127.0.0.2", 9))


def _unresolvable(monkeypatch: pytest.MonkeyPatch, *names: str) -> list[str]:
    """getaddrinfo fails for ``names`` (as DNS would for a name not there yet); every
    other lookup goes through. Returns the names looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        if host in names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def test_a_local_address_is_local() -> None:
    assert is_local_address("127.0.0.1")
    assert is_local_address("127.0.1.1")  # any of 127/8 binds on Linux
    assert not is_local_address("203.0.113.7")  # TEST-NET-3: no interface has it


@pytest.mark.parametrize(
    ("host", "local", "fqdn_asked"),
    [
        ("head-0", True, False),  # this machine's host name, not in DNS yet
        ("HEAD-0", True, False),
        ("head-0.ns.svc.cluster.local", True, True),  # its FQDN
        ("head-0.elsewhere", False, True),
        ("head-1", False, False),  # another machine's name, not in DNS yet
        ("head-1.ns.svc.cluster.local", False, False),  # FQDN only asked if it may be ours
    ],
)
def test_a_name_that_does_not_resolve_is_local_only_if_it_is_ours(
    monkeypatch: pytest.MonkeyPatch, host: str, local: bool, fqdn_asked: bool
) -> None:
    _unresolvable(monkeypatch, host)
    asked: list[bool] = []

    def getfqdn(name: str = "") -> str:
        asked.append(True)
        return "head-0.ns.svc.cluster.local"

    monkeypatch.setattr(socket, "gethostname", lambda: "head-0")
    monkeypatch.setattr(socket, "getfqdn", getfqdn)
    assert is_local_address(host) is local
    assert bool(asked) is fqdn_asked
