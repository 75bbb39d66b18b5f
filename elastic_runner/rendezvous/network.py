"""This machine's addresses and ports, as rendezvous needs them: a free port for
MASTER_PORT (or a check of the one pinned by ``rdzv.master_port``), the address other
nodes reach us at for MASTER_ADDR (never a loopback address when some node is
elsewhere), whether a host name is this machine (then the ``tcp`` backend hosts its
store here), and the ``host:port`` list of ``rdzv.endpoint``.

No Hydra or OmegaConf behind it, so the protocol and every backend can use it cheaply.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Sequence

from elastic_runner.addresses import address_towards, is_loopback
from elastic_runner.errors import ConfigError

__all__ = [
    "find_free_port",
    "is_local_address",
    "listen_socket",
    "parse_endpoints",
    "pinned_port",
    "reachable_address",
]

log = logging.getLogger(__name__)


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
        try:
            s.bind((host, 0))
        except OSError:
            # ``host`` may be no address of this machine (``rdzv.master_addr`` is given
            # job-wide, e.g. a name that resolves elsewhere): a port free on every
            # interface, as torch picks it, is free on the one the workers use.
            s.bind(("::" if family == socket.AF_INET6 else "", 0))
        return int(s.getsockname()[1])


def pinned_port(port: int) -> int:
    """``port`` (``rdzv.master_port``), given as it is: after a warning when this machine
    cannot bind it now, as worker rank 0 will have to (it is in use, or privileged).
    Never another port: the user pinned this one, and torch gives it all the same."""
    problem = _cannot_bind(port)
    if problem is not None:
        log.warning(
            "WARNING: rdzv.master_port=%d %s on this machine (group rank 0's host): the "
            "workers get MASTER_PORT=%d all the same (it is pinned), and worker rank 0 "
            "will fail to bind it for torch's store unless that changes before it starts",
            port,
            problem,
            port,
        )
    return port


def _cannot_bind(port: int) -> str | None:
    """Why a listening socket could not take ``port`` on every interface (as torch's
    store on worker rank 0 does, with SO_REUSEADDR: a previous attempt's connections in
    TIME_WAIT do not count), or ``None`` when it could."""
    for family, wildcard in ((socket.AF_INET, ""), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here: nothing on it to clash with
            continue
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind((wildcard, port))
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:  # IPv6 disabled on every interface
                    continue
                if exc.errno == errno.EADDRINUSE:
                    return "is in use"
                return f"cannot be bound ({os.strerror(exc.errno) if exc.errno else exc})"
    return None


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


#: Connections the kernel queues before the store accepts them (capped by
#: net.core.somaxconn): a thousand agents connecting at once overflowed a queue of 128
#: 2,836 times (each a SYN retried a second or more later; bench/scale.py, N=1,024).
_BACKLOG = 4096


def listen_socket(host: str | None, port: int) -> socket.socket:
    """One listening socket: on every interface (one port for IPv4 and IPv6, where the
    machine has both), or on ``host``'s first address."""
    if host is None:
        if socket.has_dualstack_ipv6():
            try:
                return socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=_BACKLOG
                )
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise
                # IPv6 there but unusable (disabled, say): IPv4 is what matters
        return socket.create_server(("", port), backlog=_BACKLOG)
    host = host.strip("[]")  # "[fd00::1]" as in an endpoint
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    return socket.create_server(address, family=family, backlog=_BACKLOG)
