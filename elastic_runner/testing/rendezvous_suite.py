"""The behaviour every store-based rendezvous must have, run in-process (threads as nodes)
over any :class:`~elastic_runner.rendezvous.store.Store`.

Use it from a backend's tests::

    class TestMyRendezvous(RendezvousSuite):
        TTL = 2.0                  # the shortest time to live the store honours well

        @pytest.fixture
        def make_store(self):
            ...                   # yield a function returning a new client of one store
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from elastic_runner.rendezvous.api import NodeInfo, RendezvousInfo, RendezvousTimeoutError
from elastic_runner.rendezvous.dynamic import DynamicRendezvous, RendezvousSettings
from elastic_runner.rendezvous.store import Store
from elastic_runner.testing.runner import free_port

__all__ = ["RendezvousSuite"]


class RendezvousSuite:
    """Subclass and provide a ``make_store`` fixture (a new client per call)."""

    TTL: float = 0.5

    @pytest.fixture
    def nodes(self, make_store: Callable[[], Store]) -> Any:
        run_id = uuid.uuid4().hex[:8]
        made: list[DynamicRendezvous] = []

        def node(min_nodes: int, max_nodes: int, **settings: float) -> DynamicRendezvous:
            options: dict[str, Any] = {
                "join_timeout": 20.0,
                "last_call_timeout": 0.3,
                "heartbeat_interval": self.TTL / 4,
                "heartbeat_timeout": self.TTL,
            }
            options.update(settings)
            handler = DynamicRendezvous(
                make_store(),
                RendezvousSettings(run_id, min_nodes, max_nodes, **options),
                backend="test",
                endpoint="test-store",
                local_addr="127.0.0.1",
            )
            made.append(handler)
            return handler

        yield node
        for handler in made:
            handler.shutdown()

    @staticmethod
    def _join_all(
        handlers: list[DynamicRendezvous], nproc: int = 1, failed: bool = False
    ) -> list[RendezvousInfo]:
        results: list[Any] = [None] * len(handlers)

        def join(i: int) -> None:
            try:
                results[i] = handlers[i].next_round(NodeInfo("r", nproc), failed)
            except Exception as exc:
                results[i] = exc

        threads = [threading.Thread(target=join, args=(i,)) for i in range(len(handlers))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def test_max_nodes_complete_at_once_with_distinct_ranks(self, nodes: Any) -> None:
        handlers = [nodes(3, 3, last_call_timeout=30) for _ in range(3)]
        t0 = time.monotonic()
        infos = self._join_all(handlers)
        assert time.monotonic() - t0 < 10  # not the 30 s last call
        assert sorted(i.group_rank for i in infos) == [0, 1, 2]
        assert {i.group_world_size for i in infos} == {3}
        assert len({(i.master_addr, i.master_port) for i in infos}) == 1

    def test_between_min_and_max_the_last_call_waits(self, nodes: Any) -> None:
        handlers = [nodes(2, 4, last_call_timeout=0.5) for _ in range(2)]
        t0 = time.monotonic()
        infos = self._join_all(handlers)
        assert time.monotonic() - t0 >= 0.5
        assert {i.group_world_size for i in infos} == {2}

    def test_a_waiting_node_triggers_a_regroup(self, nodes: Any) -> None:
        first = nodes(1, 2)
        changed = threading.Event()
        first.on_membership_change(changed.set)
        assert first.next_round(NodeInfo("r", 1)).group_world_size == 1
        late = nodes(1, 2)
        joined: list[RendezvousInfo] = []
        thread = threading.Thread(target=lambda: joined.append(late.next_round(NodeInfo("r", 1))))
        thread.start()
        assert changed.wait(10), "the running node was not told"
        again = first.next_round(NodeInfo("r", 1))
        thread.join(20)
        assert again.group_world_size == 2 and joined[0].group_world_size == 2
        assert again.restart_count == 0  # a membership change spends no restart

    def test_a_dead_node_triggers_a_regroup_within_the_ttl(self, nodes: Any) -> None:
        a, b = nodes(1, 2), nodes(1, 2)
        self._join_all([a, b])
        changed = threading.Event()
        a.on_membership_change(changed.set)
        t0 = time.monotonic()
        b._stop.set()  # b's heartbeat stops: it "died" (its key is left to expire)
        assert changed.wait(10 * self.TTL)
        assert time.monotonic() - t0 < 4 * self.TTL + 2

    def test_failure_counts_one_restart_for_the_whole_job(self, nodes: Any) -> None:
        a, b = nodes(2, 2), nodes(2, 2)
        self._join_all([a, b])
        infos: list[Any] = [None, None]

        def again(i: int, h: DynamicRendezvous) -> None:
            infos[i] = h.next_round(NodeInfo("r", 1), failed=True)

        threads = [threading.Thread(target=again, args=(i, h)) for i, h in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [i.restart_count for i in infos] == [1, 1]  # both failed, one restart

    def test_group_rank_0_publishes_the_pinned_master_port(self, nodes: Any) -> None:
        # rdzv.master_port set on group rank 0 (a fixed node_rank) and not, or otherwise,
        # on the others: every node gets group rank 0's, in every round.
        pinned = free_port()
        handlers = [
            nodes(3, 3, node_rank=0, master_port=pinned),
            nodes(3, 3, node_rank=1),
            nodes(3, 3, node_rank=2, master_port=pinned + 1 if pinned < 65535 else 1),
        ]
        for _ in range(2):
            infos = self._join_all(handlers)
            assert [i.group_rank for i in infos] == [0, 1, 2]
            assert {(i.master_addr, i.master_port) for i in infos} == {("127.0.0.1", pinned)}
        for handler in handlers:  # the last one out removes the job's keys: a new job
            handler.shutdown()
        # unset on group rank 0: a free port, whatever the others pinned (a port held
        # here meanwhile, so that a free one cannot be it by chance)
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            taken = held.getsockname()[1]
            unpinned = [nodes(2, 2, node_rank=0), nodes(2, 2, node_rank=1, master_port=taken)]
            ports = {i.master_port for i in self._join_all(unpinned)}
        assert len(ports) == 1 and ports != {taken}

    def test_timeout_names_arrived_and_expected(self, nodes: Any) -> None:
        lonely = nodes(2, 3, join_timeout=0.5)
        with pytest.raises(
            RendezvousTimeoutError, match=r"1 of 2\.\.3 nodes arrived at test store test-store"
        ):
            lonely.next_round(NodeInfo("r", 1))

    def test_the_root_cause_steps_out_and_comes_back(self, nodes: Any) -> None:
        a, b, c = (nodes(2, 3) for _ in range(3))
        self._join_all([a, b, c])
        c.report_failure(time.time())
        b.report_failure(time.time() + 0.01)
        assert [h.root_cause() for h in (a, b, c)] == [False, False, True]
        changed = threading.Event()
        a.on_membership_change(changed.set)
        assert c.step_out("excluded for a while", failed=True)
        assert changed.wait(10 * self.TTL), "the others were not told"
        infos = self._join_all([a, b])
        assert [i.group_world_size for i in infos] == [2, 2]
        assert infos[0].restart_count == 1
        c.sit_out(time.monotonic() + 2 * self.TTL)  # its out key outlives its TTL meanwhile
        changed.clear()
        back: list[RendezvousInfo] = []
        thread = threading.Thread(target=lambda: back.append(c.next_round(NodeInfo("r", 1))))
        thread.start()
        assert changed.wait(10 * self.TTL), "the returning node was not seen"
        infos = self._join_all([a, b])
        thread.join(30)
        assert {i.group_world_size for i in [*infos, *back]} == {3}
