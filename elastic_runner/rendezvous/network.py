"""This machine's addresses and ports, as rendezvous needs them: a free port for
MASTER_PORT, the address other nodes reach us at for MASTER_ADDR (never a loopback address
when some node is elsewhere), whether a host name is this machine (then the ``tcp``
backend hosts its store here), and the ``host:port`` list of ``rdzv.endpoint``.

No Hydra or OmegaConf behind it, so the protocol and every backend can use it cheaply.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from elastic_runner.addresses import address_towards, is_loopback
from elastic_runner.errors import ConfigError

__all__ = ["find_free_port", "is_local_address", "parse_endpoints", "reachable_address"]


def parse_endpoints(endpoint: str, default_port: int) -> list[tuple[str, int]]:
    """``"a:1,b"`` -> [("a", 1), ("b", default_port)]; a bad one is a
    :class:`~elastic_runner.errors.ConfigError` on ``rdzv.endpoint``."""
    out = []
    for part in endpoint.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep:
            host, port = part.strip(), str(default_port)
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(
                "rdzv.endpoint",
                endpoint,
                f"expected host:port[,host:port...], e.g. node0:{default_port}",
            )
        out.append((host, int(port)))
    return out


def find_free_port(host: str) -> int:
    """A port free on ``host`` right now (bind to port 0, read it, release it).

    The port is released before workers start because worker rank 0 binds it for torch's
    store; a fresh one per run keeps two jobs on one machine apart (torch #73320).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def reachable_address(own: str, peers: Sequence[str]) -> str:
    """The MASTER_ADDR group rank 0 advertises: ``own`` (the address it would use), unless
    that is a loopback address while some peer's is not; then this machine's address
    towards that peer (the interface the others reach it through)."""
    if is_loopback(own):
        for peer in peers:
            if not is_loopback(peer):
                return address_towards(peer, 9)  # any port: nothing is sent
    return own


def _names_this_machine(host: str) -> bool:
    """True when ``host`` is this machine's own host name or fully qualified name."""
    host = host.lower().rstrip(".")
    hostname = socket.gethostname().lower()
    if host == hostname:
        return True
    # getfqdn() may ask DNS: only when the name could be ours.
    return host.split(".", 1)[0] == hostname.split(".", 1)[0] and host == socket.getfqdn().lower()


def is_local_address(host: str) -> bool:
    """True when ``host`` names this machine (we can bind to one of its addresses). A name
    that does not resolve (yet) is not, unless it is this machine's host name or FQDN."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return _names_this_machine(host)
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], 0))
                return True
            except OSError:
                continue
    return False
