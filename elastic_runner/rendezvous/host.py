"""What every part of the dynamic rendezvous reads of the handler that owns it.

:class:`~elastic_runner.rendezvous.dynamic.DynamicRendezvous` owns its parts (forming
rounds, the watcher, the heartbeat, reaching the store, exiting, failures), each of which
declares what more it needs in a ``Protocol`` of its own built on :class:`ProtocolHost`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from elastic_runner.rendezvous.settings import RendezvousSettings
from elastic_runner.rendezvous.store import Store

__all__ = ["ProtocolHost"]


class ProtocolHost(Protocol):
    """The handler's attributes every part uses, read at each use and never copied: the
    store moves to another node at a failover, and the settings may be replaced."""

    node_id: str
    _s: RendezvousSettings
    #: The job's key prefix, ``rdzv/<run id>/``.
    _p: str
    _store: Store
    #: The store's endpoint, for messages.
    _endpoint: str
    _clock: Callable[[], float]
    #: Set when this node leaves or shuts down: its waits and threads end.
    _stop: threading.Event
