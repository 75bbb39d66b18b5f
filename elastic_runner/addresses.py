"""This machine's network addresses: the one that reaches a given peer, whether an address
is loopback, and which interface carries an address. Standard library and psutil only:
both the rendezvous (MASTER_ADDR) and the workers' environment (GLOO_SOCKET_IFNAME) use it.
"""

from __future__ import annotations

import ipaddress
import socket

__all__ = ["address_towards", "interface_of", "is_loopback"]


def address_towards(host: str, port: int) -> str:
    """This machine's address on the interface that reaches ``host`` (no packet sent)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


def is_loopback(address: str) -> bool:
    """True for an address only this machine can reach: 127.0.0.0/8, ::1 (also as
    ::ffff:127.x.y.z), ``localhost``. Other names are not: each node resolves them."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        name = address.lower().rstrip(".")
        return name == "localhost" or name.endswith(".localhost")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def interface_of(address: str) -> str | None:
    """The name of this machine's network interface that carries ``address`` (``None``
    when none does)."""
    import psutil  # only when asked: the rendezvous path never needs it

    wanted = address.split("%", 1)[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%", 1)[0] == wanted for a in addrs):
            return name
    return None
