"""GLOO_SOCKET_IFNAME for the workers of a host whose name resolves to loopback."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from elastic_runner.workers import interfaces
from elastic_runner.workers.interfaces import collective_interface_env

Resolver = Callable[[str | None], None]


@pytest.fixture
def host_name_resolves_to(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], None]:
    def resolve(address: str | None) -> None:
        def gethostbyname(name: str) -> str:
            if address is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return address

        monkeypatch.setattr(socket, "gethostbyname", gethostbyname)

    monkeypatch.setattr(interfaces, "address_towards", lambda host, port: "198.18.7.1")
    monkeypatch.setattr(interfaces, "interface_of", lambda a: "eth0" if a == "198.18.7.1" else None)
    return resolve


@pytest.mark.parametrize("resolved", ["127.0.1.1", None])
def test_a_loopback_or_unresolvable_host_name_on_a_multi_machine_job_gets_the_interface(
    host_name_resolves_to: Resolver, resolved: str | None
) -> None:
    host_name_resolves_to(resolved)
    assert collective_interface_env("198.18.7.2", {}) == {"GLOO_SOCKET_IFNAME": "eth0"}


def test_nothing_when_the_host_name_is_reachable(host_name_resolves_to: Resolver) -> None:
    host_name_resolves_to("198.18.7.1")
    assert collective_interface_env("198.18.7.2", {}) == {}


def test_nothing_when_every_node_is_on_this_machine(host_name_resolves_to: Resolver) -> None:
    host_name_resolves_to("127.0.1.1")
    assert collective_interface_env("127.0.0.1", {}) == {}


def test_the_users_choice_wins(host_name_resolves_to: Resolver) -> None:
    host_name_resolves_to("127.0.1.1")
    assert collective_interface_env("198.18.7.2", {"GLOO_SOCKET_IFNAME": "ib0"}) == {}


def test_interface_of_finds_the_loopback_interface() -> None:
    from elastic_runner.addresses import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("192.0.2.77") is None
