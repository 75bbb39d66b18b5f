"""The built-in TCP store moves to a surviving node when the agent hosting it dies.

Every agent that does not host the store reserves a listening socket at start (no
thread, nothing served: connections wait in its backlog) and announces its port in its
join record, so every member of a round knows where each other member would serve. When
the store cannot be reached any more (not even on a new connection), each survivor
connects to the other members' ports:
a member whose port refuses or does not answer is gone or cut off. A survivor that
reaches a strict majority of the last round's members (itself included) moves: the first
member it reached, in group-rank order, is the new host, and the member that finds itself
first starts serving on its socket (the others' requests, queued meanwhile, are then
answered). Every survivor that sees the same members gone picks the same host. A node
that reaches no majority does not move: it is the one cut off, and keeps trying the old
store, which it finds again when its link heals; nor does one whose elected host is
alive but does not serve (it still reaches the old store).

The new store starts empty: the survivors announce themselves again and form the next
round there (:class:`~elastic_runner.rendezvous.dynamic.DynamicRendezvous` carries the
round number and the restart count over). A round formed after a move needs a strict
majority of the last round's members, so that a partition never leaves two live worlds:
a side cut off with a minority (the old host alone, say) never forms one.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from elastic_runner.rendezvous.store import Store, StoreError, StoreUnavailableError

__all__ = ["Candidate", "Server", "StoreFailover"]

log = logging.getLogger(__name__)


class Server(Protocol):
    """A store server this node serves once it is elected."""

    #: Where a client on this machine reaches it.
    local_host: str

    def close(self) -> None: ...


@dataclass(frozen=True)
class Candidate:
    """A member of the last round that could host the store: its node id, and the
    address and port it would serve at."""

    node_id: str
    addr: str
    port: int


class StoreFailover:
    """This node's reserved socket, and the election of a new host.

    ``listen`` reserves the socket (the bind address, port 0: a free one); ``serve``
    starts a server on it; ``connect(addr, port, patience)`` makes a client of the store
    at ``addr:port`` whose first answer may take ``patience`` seconds (0: a client for
    the rest of the job, with the usual timeouts); a port that refuses connections must
    fail it within about a second."""

    def __init__(
        self,
        listen: Callable[[], socket.socket],
        serve: Callable[[socket.socket], Server],
        connect: Callable[[str, int, float], Store],
        patience: float,
    ) -> None:
        self._sock: socket.socket | None = listen()
        self.port = int(self._sock.getsockname()[1])
        self._serve = serve
        self._connect = connect
        self._patience = patience
        self._server: Server | None = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    def elect(
        self,
        candidates: Sequence[Candidate],
        me: str,
        members: int,
        hosts: Sequence[Candidate] | None = None,
    ) -> tuple[Store, str]:
        """A client of the new host's store and its ``addr:port``: the first of
        ``hosts`` (default: ``candidates``; group-rank order) that this node reaches,
        this node's own when it comes first, if it reaches a strict majority of the last
        round's ``members`` among ``candidates``; else :class:`StoreUnavailableError`
        (also when the elected node does not serve within the patience)."""
        reached = [c for c in candidates if c.node_id == me or self._reaches(c)]
        if 2 * len(reached) <= members:
            raise StoreUnavailableError(
                f"this node reaches {len(reached)} of the last round's {members} nodes, no "
                "majority: not moving the store"
            )
        if hosts is not None:
            ids = {c.node_id for c in reached}
            reached = [c for c in hosts if c.node_id in ids]
        return self._move_to(reached, me)

    def follow(self, hosts: Sequence[Candidate]) -> tuple[Store, str]:
        """A client of the store that the first of ``hosts`` this node reaches serves
        after a move (a host serves only once it reached a majority); else
        :class:`StoreUnavailableError`: none reached, or the first one reached does not
        serve within the patience (it is alive and still on the old store)."""
        return self._move_to([c for c in hosts if self._reaches(c)], "")

    def _move_to(self, reached: Sequence[Candidate], me: str) -> tuple[Store, str]:
        for c in reached:
            if c.node_id == me:
                local = self._start().local_host
                log.warning("this node hosts the rendezvous store now (port %d)", c.port)
                return self._connect(local, c.port, 0.0), f"{c.addr}:{c.port}"
            probe = self._connect(c.addr, c.port, self._patience)
            try:
                probe.get("failover")  # answered once that node serves
            except StoreError as exc:
                # alive, and still on the old store (it reaches it, this node does not)
                raise StoreUnavailableError(
                    f"node {c.node_id} does not host the store after the move ({exc}): "
                    "not moving it"
                ) from None
            finally:
                probe.close()
            log.warning("the rendezvous store moved to node %s at %s:%d", c.node_id, c.addr, c.port)
            return self._connect(c.addr, c.port, 0.0), f"{c.addr}:{c.port}"
        raise StoreUnavailableError("no surviving member of the last round can host the store")

    def answers(self, addr: str, port: int) -> bool:
        """Whether the store at ``addr:port`` answers a new connection now (a store this
        node lost on a link that has healed since, say)."""
        store = self._connect(addr, port, 0.0)
        try:
            store.get("failover")
            return True
        except StoreError:
            return False
        finally:
            store.close()

    @staticmethod
    def _reaches(c: Candidate) -> bool:
        """Whether ``c``'s reserved port takes a connection (its agent lives, and the way
        there is open) within a second."""
        try:
            with socket.create_connection((c.addr, c.port), timeout=1.0):
                return True
        except OSError:
            return False

    def _start(self) -> Server:
        if self._server is None:
            assert self._sock is not None
            self._server = self._serve(self._sock)
            self._sock = None  # the server's now
        return self._server

    def close(self) -> None:
        """Stop serving, or release the reserved socket."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
