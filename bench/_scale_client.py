"""One client process of ``bench/scale.py``: hosts rendezvous participants in threads.

Not a benchmark by itself. Started by ``bench/scale.py`` with one JSON argument (the
backend, the store's address, the run id, the settings, how many participants); runs
under this project's virtualenv for ``tcp``, ``etcd`` and ``redis`` (elastic-run's
``DynamicRendezvous``, one store client each) and under the ``--torch-python`` for
``torch`` (torch's ``DynamicRendezvousHandler`` on ``C10dRendezvousBackend``, one
``TCPStore`` client each), so it imports neither at the top.

Each participant is a thread that calls ``next_round`` at a given wall-clock time, then
waits until its round must re-form (elastic-run: the membership callback; torch: its
agent's monitor loop, ``num_nodes_waiting() > 0`` polled every monitor interval, or told
by the bench that its workers failed) and calls ``next_round`` again; every completed
round is recorded as (wall time done, world size).

Commands, one per line on stdin; each gets one JSON line on stdout:

* ``go T``: the participants not started yet call ``next_round`` at wall time ``T``;
* ``settings MIN MAX``: every participant's min/max nodes from now on;
* ``add K T MIN MAX``: K more participants (with those min/max) start at ``T``;
* ``kill K T``: K live participants die at once (heartbeats and watches stop, their
  connections are cut, nothing is written): the others must notice; under ``torch`` the
  survivors are also told at ``T`` to re-join (as their agents would once the workers of
  the dead fail);
* ``wait T TIMEOUT WORLD``: wait until every live participant's latest round was done at
  or after ``T`` with ``WORLD`` members; answers the seconds from ``T`` per participant;
* ``quit``: exit at once (``os._exit``: the bench kills the store anyway).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


class Participant:
    """One rendezvous participant and the thread that drives it."""

    def __init__(self, index: int, cfg: dict[str, Any], lo: int, hi: int) -> None:
        self.index = index
        self.cfg = cfg
        self.dead = threading.Event()
        self.regroup = threading.Event()
        self.records: list[tuple[float, int]] = []
        self.error: str | None = None
        self.thread: threading.Thread | None = None
        backend = cfg["backend"]
        self._make = _torch_handler if backend == "torch" else _elastic_handler
        self.handler, self._join, self._watch, self._kill, self._settings = self._make(
            self, cfg, lo, hi
        )

    def start(self, at: float) -> None:
        self.thread = threading.Thread(target=self._run, args=(at,), daemon=True)
        self.thread.start()

    def _run(self, at: float) -> None:
        time.sleep(max(0.0, at - time.time()))
        try:
            while not self.dead.is_set():
                world = self._join()
                if self.dead.is_set():
                    return
                self.records.append((time.time(), world))
                self._watch()
                self.regroup.clear()
        except BaseException as exc:  # reported to the bench
            if not self.dead.is_set():
                self.error = f"{type(exc).__name__}: {exc}"[:500]

    def kill(self) -> None:
        self.dead.set()
        self.regroup.set()
        with contextlib.suppress(Exception):
            self._kill()

    def set_nodes(self, lo: int, hi: int) -> None:
        self._settings(lo, hi)


def _elastic_handler(
    p: Participant, cfg: dict[str, Any], lo: int, hi: int
) -> tuple[Any, Callable[[], int], Callable[[], None], Callable[[], None], Callable[..., None]]:
    from elastic_runner.rendezvous.api import NodeInfo
    from elastic_runner.rendezvous.dynamic import DynamicRendezvous, RendezvousSettings

    backend, host, port = cfg["backend"], cfg["host"], int(cfg["port"])
    patience = float(cfg["budget"])
    store: Any
    if backend == "tcp":
        from elastic_runner.rendezvous.tcp_store import TCPStoreClient

        source = _address(cfg["source_prefix"], p.index)
        store = TCPStoreClient(
            host,
            port,
            connect_timeout=patience,
            request_timeout=patience,
            source_address=(source, 0),
        )
    elif backend == "etcd":
        from elastic_runner.rendezvous.etcd_store import EtcdStore

        # etcd listens on several loopback addresses: spread the connections over them
        address = (_spread(p.index, int(cfg["spread"])), port)
        store = EtcdStore([address], timeout=patience, api=str(cfg.get("etcd_api", "http")))
    elif backend == "redis":
        from elastic_runner_redis.store import RedisStore

        store = RedisStore(_spread(p.index, int(cfg["spread"])), port, timeout=patience)
    else:
        raise ValueError(backend)
    settings = RendezvousSettings(
        run_id=cfg["run_id"],
        min_nodes=lo,
        max_nodes=hi,
        join_timeout=patience,
        last_call_timeout=float(cfg["last_call"]),
        heartbeat_interval=float(cfg["heartbeat_interval"]),
        heartbeat_timeout=float(cfg["heartbeat_timeout"]),
    )
    h = DynamicRendezvous(store, settings, backend=backend, endpoint=f"{host}:{port}",
                          local_addr="127.0.0.1")  # fmt: skip
    h.on_membership_change(p.regroup.set)

    def join() -> int:
        return len(h.next_round(NodeInfo("default", 1)).nodes)

    def watch() -> None:
        p.regroup.wait()

    def kill() -> None:
        h._stop.set()  # heartbeat and watcher end; nothing is written (no leave)
        for sock in list(getattr(store, "_all", [])):  # the TCP store's connections
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        store.close()

    def set_nodes(lo: int, hi: int) -> None:
        h._s = dataclasses.replace(h._s, min_nodes=lo, max_nodes=hi)

    return h, join, watch, kill, set_nodes


def _torch_handler(
    p: Participant, cfg: dict[str, Any], lo: int, hi: int
) -> tuple[Any, Callable[[], int], Callable[[], None], Callable[[], None], Callable[..., None]]:
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
        RendezvousTimeout,
    )

    patience = timedelta(seconds=float(cfg["budget"]))
    store = TCPStore(cfg["host"], int(cfg["port"]), is_master=False, use_libuv=True,
                     timeout=patience)  # fmt: skip
    run_id = cfg["run_id"]
    interval = float(cfg["heartbeat_interval"])
    attempts = max(1, round(float(cfg["heartbeat_timeout"]) / interval))
    h = DynamicRendezvousHandler.from_backend(
        run_id,
        store,
        C10dRendezvousBackend(store, run_id),
        lo,
        hi,
        local_addr="127.0.0.1",
        timeout=RendezvousTimeout(
            join=patience,
            # torch refuses 0: the smallest it takes
            last_call=timedelta(milliseconds=max(1, int(float(cfg["last_call"]) * 1000))),
            close=timedelta(seconds=30),
            heartbeat=timedelta(seconds=float(cfg["heartbeat_timeout"])),
        ),
        keep_alive_interval=interval,  # seconds (a float works; torch hints int)
        keep_alive_max_attempt=attempts,
    )
    monitor = float(cfg["torch_monitor_interval"])

    def join() -> int:
        return _world(h)

    def watch() -> None:
        # torch's agent: every monitor_interval, restart when nodes wait to join
        while not p.regroup.wait(monitor):
            if h.num_nodes_waiting() > 0:
                return

    def kill() -> None:
        h._stop_heartbeats()

    def set_nodes(lo: int, hi: int) -> None:
        for owner in (h, getattr(h, "_state_holder", None), getattr(h, "_op_executor", None)):
            if owner is not None and hasattr(owner, "_settings"):
                owner._settings = dataclasses.replace(owner._settings, min_nodes=lo, max_nodes=hi)

    return h, join, watch, kill, set_nodes


def _world(h: Any) -> int:
    """torch's ``next_rendezvous`` (2.13; ``next_round`` in older releases)."""
    call = getattr(h, "next_rendezvous", None) or h.next_round
    info = call()
    if hasattr(info, "world_size"):
        return int(info.world_size)
    return int(info[2])  # (store, rank, world_size)


def _address(prefix: str, index: int) -> str:
    """A distinct loopback address per index under ``prefix`` (``127.1`` ->
    ``127.1.0.1``, ``127.1.0.2``, ...; 250 per third byte)."""
    a, b = divmod(index, 250)
    return f"{prefix}.{a}.{b + 1}"


def _spread(index: int, count: int) -> str:
    """One of the ``count`` loopback addresses a server listens on: 127.0.0.1..count."""
    return f"127.0.0.{1 + index % count}"


class Host:
    """The participants of this process, and the commands that drive them."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.next_index = int(cfg["first_index"])
        self.parts: list[Participant] = []
        self.pending: list[Participant] = []
        self.add(int(cfg["count"]), int(cfg["min_nodes"]), int(cfg["max_nodes"]))

    def add(self, count: int, lo: int, hi: int) -> None:
        for _ in range(count):
            part = Participant(self.next_index, self.cfg, lo, hi)
            self.next_index += 1
            self.parts.append(part)
            self.pending.append(part)

    def go(self, at: float) -> None:
        for part in self.pending:
            part.start(at)
        self.pending = []

    def live(self) -> list[Participant]:
        return [p for p in self.parts if not p.dead.is_set()]

    def kill(self, count: int, at: float) -> None:
        live = self.live()
        # spread over the join order: not only the first (rank 0 among them)
        step = max(1, len(live) // max(1, count))
        victims = live[::step][:count]
        for p in victims:
            p.kill()
        if self.cfg["backend"] == "torch":
            time.sleep(max(0.0, at - time.time()))
            for p in self.live():
                p.regroup.set()

    def wait(self, since: float, timeout: float, world: int) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            live = self.live()
            errors = [p.error for p in live if p.error]
            ready = [
                p
                for p in live
                if p.records and p.records[-1][0] >= since and p.records[-1][1] == world
            ]
            if errors or len(ready) == len(live) or time.monotonic() > deadline:
                return {
                    "times": [p.records[-1][0] - since for p in ready],
                    "missing": len(live) - len(ready),
                    "errors": errors[:5],
                    "error_count": len(errors),
                    "timeout": not errors and len(ready) < len(live),
                }
            time.sleep(0.05)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    # the participants' warnings, timed (the bench keeps this log per client process)
    logging.basicConfig(format="%(asctime)s %(threadName)s %(message)s", level=logging.WARNING)
    threading.stack_size(512 << 10)  # thousands of threads: keep their address space small
    host = Host(cfg)
    out = sys.stdout

    def reply(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    reply({"ready": True, "pid": os.getpid()})
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        try:
            if cmd == "go":
                host.go(float(args[0]))
                reply({"ok": True})
            elif cmd == "settings":
                for p in host.parts:
                    p.set_nodes(int(args[0]), int(args[1]))
                reply({"ok": True})
            elif cmd == "add":
                host.add(int(args[0]), int(args[2]), int(args[3]))
                host.go(float(args[1]))
                reply({"ok": True})
            elif cmd == "kill":
                host.kill(int(args[0]), float(args[1]))
                reply({"ok": True})
            elif cmd == "wait":
                reply(host.wait(float(args[0]), float(args[1]), int(args[2])))
            elif cmd == "quit":
                break
            else:
                reply({"error": f"unknown command {cmd!r}"})
        except Exception as exc:  # told to the bench, which fails the run
            reply({"error": f"{type(exc).__name__}: {exc}"})
    out.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
