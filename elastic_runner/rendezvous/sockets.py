"""What the store clients (tcp, etcd) and the tcp store's server ask of a connected socket."""

from __future__ import annotations

import select
import socket
import ssl

__all__ = ["readable"]


def readable(sock: socket.socket, seconds: float = 0.0) -> bool:
    """Whether ``sock`` has something to read (or was closed by its peer) within
    ``seconds``: asked of an idle connection before a request, it means the server
    closed it. TLS data already decrypted counts; a failed wait counts as yes.
    ``poll``, not ``select``: select refuses descriptors from 1024 on, and answering yes
    for them made every request of a client with that many files open (a store-hosting
    agent of a large job, a benchmark's client process) a new connection and a hello."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(max(0, int(seconds * 1000))))
    except (OSError, ValueError):
        return True
