"""The rendezvous conformance suite on the in-memory store, the TCP store and etcd; and
the MASTER_ADDR group rank 0 advertises, given every member's address."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elastic_runner.rendezvous import dynamic, network
from elastic_runner.rendezvous.api import (
    NodeInfo,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousInfo,
)
from elastic_runner.rendezvous.dynamic import DynamicRendezvous, RendezvousSettings
from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.rendezvous.kit import parse_endpoints
from elastic_runner.rendezvous.store import MemoryStore
from elastic_runner.rendezvous.tcp_server import TCPStoreServer
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.testing.etcd import EtcdServer
from elastic_runner.testing.rendezvous_suite import RendezvousSuite


class TestOnMemoryStore(RendezvousSuite):
    @pytest.fixture
    def make_store(self) -> Callable[[], MemoryStore]:
        shared = MemoryStore()
        return lambda: shared


class TestOnTCPStore(RendezvousSuite):
    @pytest.fixture
    def make_store(self) -> Iterator[Callable[[], TCPStoreClient]]:
        server = TCPStoreServer("127.0.0.1", 0)
        yield lambda: TCPStoreClient("127.0.0.1", server.port)
        server.close()


class TestOnEtcd(RendezvousSuite):
    TTL = 2.0

    @pytest.fixture
    def make_store(self, etcd_server: EtcdServer) -> Callable[[], EtcdStore]:
        namespace = f"/suite-{time.monotonic_ns()}/"
        return lambda: EtcdStore(parse_endpoints(etcd_server.endpoint, 2379), namespace=namespace)


# -- MASTER_ADDR: what group rank 0 advertises, from every member's join record ---------


def _form(
    monkeypatch: pytest.MonkeyPatch, addrs: list[str | Callable[[], str]]
) -> tuple[list[RendezvousInfo], list[str]]:
    """One round of ``len(addrs)`` nodes on one store, node ``i`` with group rank ``i``
    and ``local_addr`` ``addrs[i]`` (a string: given as rdzv.local_addr; a function: the
    default, e.g. the store client's own address). Returns each node's round and the
    peers rank 0 asked its route towards (answered 10.0.0.1; nothing is sent)."""
    asked: list[str] = []

    def address_towards(host: str, port: int) -> str:
        asked.append(host)
        return "10.0.0.1"

    monkeypatch.setattr(network, "address_towards", address_towards)
    monkeypatch.setattr(dynamic, "find_free_port", lambda addr: 4242)  # no bind to fakes
    store, run_id = MemoryStore(), uuid.uuid4().hex[:8]
    handlers = [
        DynamicRendezvous(
            store,
            RendezvousSettings(run_id, len(addrs), len(addrs), join_timeout=10, node_rank=i),
            backend="test",
            endpoint="test-store",
            local_addr=addr,
        )
        for i, addr in enumerate(addrs)
    ]
    infos: list[Any] = [None] * len(handlers)

    def join(i: int) -> None:
        infos[i] = handlers[i].next_round(NodeInfo("default", 1))

    threads = [threading.Thread(target=join, args=(i,)) for i in range(len(handlers))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        for h in handlers:
            h.shutdown()
    assert [info.group_rank for info in infos] == list(range(len(addrs)))
    assert {(info.master_addr, info.master_port) for info in infos} == {
        (infos[0].master_addr, 4242)
    }
    return infos, asked


def _default(addr: str) -> Callable[[], str]:
    return lambda: addr


@pytest.mark.parametrize(
    ("addrs", "master", "asked"),
    [
        # every node on this machine: loopback is right
        (["127.0.0.1", "127.0.0.1"], "127.0.0.1", []),
        ([_default("127.0.0.1"), _default("127.0.0.1")], "127.0.0.1", []),
        # rank 0 hosts the store and reaches it over loopback, the others are elsewhere:
        # its address on the interface towards them (the first non-loopback one)
        ([_default("127.0.1.1"), _default("10.0.0.2")], "10.0.0.1", ["10.0.0.2"]),
        (
            [_default("127.0.0.1"), _default("127.0.0.1"), _default("10.0.0.3")],
            "10.0.0.1",
            ["10.0.0.3"],
        ),
        # rank 0 already has a reachable address; a loopback peer changes nothing
        ([_default("10.0.0.7"), _default("10.0.0.2")], "10.0.0.7", []),
        ([_default("10.0.0.7"), _default("127.0.0.1")], "10.0.0.7", []),
        # rdzv.local_addr always wins, loopback or not
        (["127.0.0.1", _default("10.0.0.2")], "127.0.0.1", []),
        (["node0.example.org", _default("10.0.0.2")], "node0.example.org", []),
        # another node's rdzv.local_addr is its address too
        ([_default("127.0.0.1"), "10.0.0.9"], "10.0.0.1", ["10.0.0.9"]),
    ],
)
def test_master_addr_is_reachable_by_every_member(
    monkeypatch: pytest.MonkeyPatch,
    addrs: list[str | Callable[[], str]],
    master: str,
    asked: list[str],
) -> None:
    infos, towards = _form(monkeypatch, addrs)
    assert infos[0].master_addr == master
    assert towards == asked


def test_each_node_finds_its_address_once_per_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def addr(i: int) -> Callable[[], str]:
        def find() -> str:
            calls.append(i)
            return f"10.0.0.{i + 1}"

        return find

    infos, _ = _form(monkeypatch, [addr(0), addr(1)])
    assert sorted(calls) == [0, 1]  # in the join record, read back by rank 0
    assert infos[1].master_addr == "10.0.0.1"


def test_a_done_record_without_addresses_still_completes(monkeypatch: pytest.MonkeyPatch) -> None:
    # written by an agent from before addresses were in the record: [node id, role, nproc]
    monkeypatch.setattr(dynamic, "find_free_port", lambda addr: 4242)
    store, run_id = MemoryStore(), uuid.uuid4().hex[:8]
    handler = DynamicRendezvous(
        store,
        RendezvousSettings(run_id, 1, 1, join_timeout=10),
        backend="test",
        endpoint="test-store",
        local_addr=_default("127.0.0.1"),
    )
    store.set(f"rdzv/{run_id}/round", "0")
    store.set(f"rdzv/{run_id}/alive/{handler.node_id}", "1")
    store.set(f"rdzv/{run_id}/r0/done", json.dumps([[handler.node_id, "default", 2]]))
    try:
        info = handler.next_round(NodeInfo("default", 2))
    finally:
        handler.shutdown()
    assert (info.group_rank, info.nodes, info.master_addr) == (
        0,
        (NodeInfo("default", 2),),
        "127.0.0.1",
    )


# -- hot spares: nodes beyond max_nodes stand by ----------------------------------------


class _Job:
    """Handlers of one job on one in-memory store (hot spare tests)."""

    def __init__(self, min_nodes: int, max_nodes: int, **settings: float) -> None:
        self.store, self.run_id = MemoryStore(), uuid.uuid4().hex[:8]
        self.min_nodes, self.max_nodes = min_nodes, max_nodes
        self.settings: dict[str, Any] = {
            "join_timeout": 20.0,
            "last_call_timeout": 30.0,  # a round completes at max_nodes, never by last call
            "heartbeat_interval": 0.05,
            "heartbeat_timeout": 0.5,
            **settings,
        }
        self.handlers: list[DynamicRendezvous] = []

    def node(self) -> DynamicRendezvous:
        handler = DynamicRendezvous(
            self.store,
            RendezvousSettings(self.run_id, self.min_nodes, self.max_nodes, **self.settings),
            backend="test",
            endpoint="test-store",
            local_addr="127.0.0.1",
        )
        self.handlers.append(handler)
        return handler

    def close(self) -> None:
        for handler in self.handlers:
            handler.shutdown()


class _Joining:
    """``next_round`` of one handler in a thread: its result or exception."""

    def __init__(self, handler: DynamicRendezvous, failed: bool = False) -> None:
        self.handler = handler
        self.result: RendezvousInfo | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(failed,), daemon=True)
        self.thread.start()

    def _run(self, failed: bool) -> None:
        try:
            self.result = self.handler.next_round(NodeInfo("r", 1), failed)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 20) -> RendezvousInfo:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "next_round did not return"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _until(condition: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def spares() -> Iterator[Callable[..., _Job]]:
    made: list[_Job] = []

    def make(min_nodes: int, max_nodes: int, **settings: float) -> _Job:
        made.append(_Job(min_nodes, max_nodes, **settings))
        return made[-1]

    yield make
    for job in made:
        job.close()


def _form_job(job: _Job, count: int) -> list[DynamicRendezvous]:
    handlers = [job.node() for _ in range(count)]
    joins = [_Joining(h) for h in handlers]
    for j in joins:
        assert j.join().group_world_size == count
    return handlers


def _standby(job: _Job) -> tuple[DynamicRendezvous, _Joining]:
    spare = job.node()
    joining = _Joining(spare)
    _until(lambda: (spare.progress() or "").startswith("standby"))
    return spare, joining


def test_a_node_beyond_max_stands_by_without_join_timeout(
    spares: Callable[..., _Job], caplog: pytest.LogCaptureFixture
) -> None:
    job = spares(2, 2, join_timeout=0.5)
    _form_job(job, 2)
    caplog.set_level("INFO", logger="elastic_runner.rendezvous.dynamic")
    spare, joining = _standby(job)
    assert spare.progress() == (
        "standby: the job runs on 2 of 2 nodes; this node takes the place of one that is lost"
    )
    time.sleep(1.5)  # three join timeouts: a standby waits as long as the job runs
    assert joining.thread.is_alive() and joining.error is None
    said = [r.getMessage() for r in caplog.records if "standby" in r.getMessage()]
    assert said == [
        "standby: the job runs on 2 of 2 nodes; this node takes the place of one that is lost"
    ]
    assert spare.num_nodes_waiting() == 1


def test_a_standby_does_not_make_a_full_job_regroup(spares: Callable[..., _Job]) -> None:
    job = spares(1, 2)
    a, b = _form_job(job, 2)
    changed = threading.Event()
    a.on_membership_change(changed.set)
    b.on_membership_change(changed.set)
    _standby(job)
    assert not changed.wait(1.0)


def test_a_standby_ends_when_the_job_finishes(spares: Callable[..., _Job]) -> None:
    job = spares(2, 2)
    a, b = _form_job(job, 2)
    _, joining = _standby(job)
    barriers = [threading.Thread(target=h.exit_barrier) for h in (a, b)]
    for t in barriers:
        t.start()
    t0 = time.monotonic()
    with pytest.raises(RendezvousGracefulExitError, match="without needing this standby node"):
        joining.join()
    assert time.monotonic() - t0 < 2
    for t in barriers:
        t.join(10)
    assert job.store.get(f"rdzv/{job.run_id}/finished") in {a.node_id, b.node_id}


def test_a_job_of_one_node_marks_itself_finished(spares: Callable[..., _Job]) -> None:
    job = spares(1, 1)
    [a] = _form_job(job, 1)
    _, joining = _standby(job)
    assert a.exit_barrier()
    with pytest.raises(RendezvousGracefulExitError):
        joining.join()


def test_a_late_node_ends_when_it_finds_the_job_finished(spares: Callable[..., _Job]) -> None:
    job = spares(2, 2)
    a, b = _form_job(job, 2)
    for h in (a, b):
        threading.Thread(target=h.exit_barrier).start()
    _until(lambda: job.store.get(f"rdzv/{job.run_id}/finished"))
    with pytest.raises(RendezvousGracefulExitError, match="while this node waited to join"):
        _Joining(job.node()).join()


def test_a_standby_ends_when_the_job_fails(spares: Callable[..., _Job]) -> None:
    job = spares(2, 2)
    a, _ = _form_job(job, 2)
    _, joining = _standby(job)
    t0 = time.monotonic()
    a.fail_job("restarts used up")
    with pytest.raises(RendezvousError, match="the job failed on another node") as caught:
        joining.join()
    assert not isinstance(caught.value, RendezvousGracefulExitError)
    assert time.monotonic() - t0 < 2


def test_a_standby_takes_a_lost_nodes_place_at_once(spares: Callable[..., _Job]) -> None:
    job = spares(2, 2)
    a, b = _form_job(job, 2)
    spare, joining = _standby(job)
    b.leave("stopped by SIGKILL")  # b's liveness key is gone: a regroups (the agent's part)
    t0 = time.monotonic()
    again = _Joining(a).join()
    took = joining.join()
    assert time.monotonic() - t0 < 5  # no last call (30 s)
    assert again.group_world_size == took.group_world_size == 2
    assert again.round == took.round == 1
    assert again.restart_count == took.restart_count == 0
    assert spare.progress() is None


def test_two_standbys_for_one_place_the_survivor_keeps_its_own(
    spares: Callable[..., _Job],
) -> None:
    job = spares(2, 2)
    a, b = _form_job(job, 2)
    s1, j1 = _standby(job)
    s2, j2 = _standby(job)
    b.leave("stopped by SIGKILL")
    # round 1 starts (a's part), and both standbys are in it before a is: they wait for a
    job.store.compare_set(f"rdzv/{job.run_id}/round", "0", "1")
    joins = [f"rdzv/{job.run_id}/r1/join/{s.node_id}" for s in (s1, s2)]
    _until(lambda: all(job.store.get(key) for key in joins))
    time.sleep(0.3)
    assert j1.thread.is_alive() and j2.thread.is_alive()
    again = _Joining(a).join()
    assert again.group_world_size == 2
    _until(lambda: not j1.thread.is_alive() or not j2.thread.is_alive())
    took = [j for j in (j1, j2) if not j.thread.is_alive()]
    assert len(took) == 1 and took[0].join().round == 1
    waiting = s2 if took[0] is j1 else s1
    _until(lambda: (waiting.progress() or "").startswith("standby"))
    assert (j2 if took[0] is j1 else j1).thread.is_alive()


def test_standbys_restart_a_job_whose_nodes_are_all_gone(spares: Callable[..., _Job]) -> None:
    job = spares(1, 1)
    [a] = _form_job(job, 1)
    _, joining = _standby(job)
    a.leave("stopped by SIGKILL")
    info = joining.join()
    assert (info.round, info.group_world_size) == (1, 1)


def test_a_survivor_still_stopping_keeps_its_place_until_the_last_call(
    spares: Callable[..., _Job],
) -> None:
    # a survivor that does not come (still stopping its workers): the last call decides
    job = spares(2, 2, last_call_timeout=0.5)
    _, b = _form_job(job, 2)
    _, j1 = _standby(job)
    _, j2 = _standby(job)
    b.leave("stopped by SIGKILL")
    job.store.compare_set(f"rdzv/{job.run_id}/round", "0", "1")  # a started round 1 ...
    t0 = time.monotonic()
    infos = [j1.join(), j2.join()]  # ... and never joined it
    assert time.monotonic() - t0 >= 0.5
    assert [i.group_world_size for i in infos] == [2, 2]


# -- exclusion: failure reports, stepping out and back in ------------------------------


def test_the_earliest_failure_report_is_the_root_cause(spares: Callable[..., _Job]) -> None:
    job = spares(3, 3)
    a, b, c = _form_job(job, 3)
    b.report_failure(1000.5)
    c.report_failure(1000.2)
    job.store.set(f"rdzv/{job.run_id}/r0/failure/garbage", "not a time")
    assert [h.root_cause() for h in (a, b, c)] == [False, False, True]


def test_a_node_steps_out_and_the_others_re_form_without_it(
    spares: Callable[..., _Job], caplog: pytest.LogCaptureFixture
) -> None:
    job = spares(2, 3, last_call_timeout=0.2)
    a, b, c = _form_job(job, 3)
    changed = threading.Event()
    a.on_membership_change(changed.set)
    leases: list[float | None] = []
    c.on_lease(leases.append)
    assert c.step_out("excluded for 5 s: tests", failed=True)
    assert changed.wait(5) and leases[-1] is None
    assert "stepped out of the job (excluded for 5 s: tests): the job re-forms" in caplog.text
    again = [_Joining(h) for h in (a, b)]
    infos = [j.join() for j in again]
    assert [i.group_world_size for i in infos] == [2, 2]
    assert infos[0].restart_count == 1  # the failure's restart, counted once
    p = f"rdzv/{job.run_id}/"
    time.sleep(0.3)  # several heartbeats: none brings c's liveness key back
    assert job.store.get(p + "alive/" + c.node_id) is None
    assert job.store.get(p + "out/" + c.node_id) == "excluded for 5 s: tests"


def test_a_node_the_job_cannot_spare_does_not_step_out(spares: Callable[..., _Job]) -> None:
    job = spares(2, 3, last_call_timeout=0.2)
    _, b = _form_job(job, 2)
    assert not b.step_out("excluded", failed=True)
    assert job.store.get(f"rdzv/{job.run_id}/alive/{b.node_id}") == "1"
    assert b.root_cause() is False  # still in its round, which had no failure


def test_a_standby_lets_a_full_job_spare_a_node(spares: Callable[..., _Job]) -> None:
    job = spares(2, 2)
    a, b = _form_job(job, 2)
    _, joining = _standby(job)
    assert b.step_out("excluded", failed=True)
    again = _Joining(a).join()
    assert again.group_world_size == joining.join().group_world_size == 2


def test_sitting_out_ends_at_its_time_or_with_the_job(spares: Callable[..., _Job]) -> None:
    job = spares(2, 3, last_call_timeout=0.2)
    *_, c = _form_job(job, 3)
    assert c.step_out("excluded", failed=False)
    t0 = time.monotonic()
    c.sit_out(time.monotonic() + 0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    finisher = threading.Timer(0.2, lambda: job.store.set(f"rdzv/{job.run_id}/finished", "x"))
    finisher.start()
    with pytest.raises(RendezvousGracefulExitError, match="while this node sat out"):
        c.sit_out(time.monotonic() + 30)
    assert time.monotonic() - t0 < 5
    finisher.join()


def test_sitting_out_ends_when_the_job_fails(spares: Callable[..., _Job]) -> None:
    job = spares(2, 3, last_call_timeout=0.2)
    a, _, c = _form_job(job, 3)
    assert c.step_out("excluded", failed=False)
    a.fail_job("restarts used up")
    with pytest.raises(RendezvousError, match="the job failed on another node") as caught:
        c.sit_out(time.monotonic() + 30)
    assert not isinstance(caught.value, RendezvousGracefulExitError)


def test_a_node_back_from_sitting_out_joins_as_a_newcomer(spares: Callable[..., _Job]) -> None:
    job = spares(2, 3, last_call_timeout=0.2)
    a, b, c = _form_job(job, 3)
    assert c.step_out("excluded", failed=True)
    infos = [_Joining(h) for h in (a, b)]
    assert [j.join().group_world_size for j in infos] == [2, 2]
    changed = threading.Event()
    a.on_membership_change(changed.set)
    back = _Joining(c)
    assert changed.wait(5)  # a node waits to join: the two re-form with it
    infos = [_Joining(h) for h in (a, b)]
    assert {j.join().group_world_size for j in [*infos, back]} == {3}
    p = f"rdzv/{job.run_id}/"
    assert job.store.get(p + "out/" + c.node_id) is None
    assert job.store.get(p + "alive/" + c.node_id) == "1"


def test_the_store_host_waits_for_a_node_sitting_out(spares: Callable[..., _Job]) -> None:
    job = spares(1, 2)
    host = DynamicRendezvous(
        job.store,
        RendezvousSettings(job.run_id, 1, 2, heartbeat_interval=0.05, heartbeat_timeout=0.5),
        backend="test",
        endpoint="test-store",
        local_addr="127.0.0.1",
        on_close=lambda: None,
    )
    other = job.node()
    joins = [_Joining(h) for h in (host, other)]
    for j in joins:
        j.join()
    assert other.step_out("excluded", failed=False)
    closing = threading.Thread(target=host.shutdown)
    closing.start()
    closing.join(0.5)
    assert closing.is_alive()  # the node sitting out will need the store
    other.shutdown()
    closing.join(5)
    assert not closing.is_alive()


def test_the_last_node_out_removes_the_jobs_keys(spares: Callable[..., _Job]) -> None:
    job = spares(2, 2)
    for handler in _form_job(job, 2):
        handler.shutdown()
    assert job.store.scan(f"rdzv/{job.run_id}/")[0] == {}
