"""The store moves to a surviving node: the election over real TCP store servers, and
the rendezvous that carries the round and the restart count over to the new store."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator

import pytest

from elastic_runner.rendezvous import dynamic
from elastic_runner.rendezvous.api import NodeInfo, RendezvousError
from elastic_runner.rendezvous.dynamic import DynamicRendezvous, RendezvousSettings
from elastic_runner.rendezvous.failover import Candidate, StoreFailover
from elastic_runner.rendezvous.network import listen_socket
from elastic_runner.rendezvous.store import Store, StoreUnavailableError
from elastic_runner.rendezvous.tcp_server import TCPStoreServer
from elastic_runner.rendezvous.tcp_store import TCPStoreClient
from elastic_runner.testing.rendezvous_suite import RendezvousSuite


def _failover(patience: float = 5.0, least: float = 2.0) -> StoreFailover:
    """A failover on 127.0.0.1 whose probe of a host waits ``patience`` for it to serve
    (its clients' requests at least ``least``)."""
    return StoreFailover(
        lambda: listen_socket("127.0.0.1", 0),
        lambda sock: TCPStoreServer(None, 0, listening=sock),
        lambda addr, port, wait: TCPStoreClient(
            addr, port, connect_timeout=1.0, request_timeout=max(wait, least)
        ),
        patience=patience,
    )


@pytest.fixture
def failovers() -> Iterator[list[StoreFailover]]:
    made = [_failover() for _ in range(3)]
    yield made
    for f in made:
        f.close()


def _candidates(failovers: list[StoreFailover]) -> list[Candidate]:
    return [Candidate(f"n{i}", "127.0.0.1", f.port) for i, f in enumerate(failovers)]


def test_the_first_candidate_that_answers_hosts(failovers: list[StoreFailover]) -> None:
    candidates = _candidates(failovers)
    failovers[0].close()  # n0 is gone: its port refuses
    found: list[tuple[Store, str]] = []
    # n2 asks first: n1 serves only once it elects itself, and n2's request waits for it
    asking = threading.Thread(target=lambda: found.append(failovers[2].elect(candidates, "n2", 3)))
    asking.start()
    store1, endpoint1 = failovers[1].elect(candidates, "n1", 3)
    asking.join(10)
    store2, endpoint2 = found[0]
    assert endpoint1 == endpoint2 == f"127.0.0.1:{failovers[1].port}"
    assert failovers[1].serving and not failovers[2].serving
    store1.set("k", "v")
    assert store2.get("k") == "v"  # one store
    store1.close()
    store2.close()


def test_a_node_that_reaches_no_majority_does_not_move(failovers: list[StoreFailover]) -> None:
    candidates = _candidates(failovers)
    for f in failovers[:2]:
        f.close()
    with pytest.raises(StoreUnavailableError, match="reaches 1 of the last round's 3 nodes"):
        failovers[2].elect(candidates, "n2", 3)


# -- the rendezvous over a store whose host dies -----------------------------------------


class _Cluster:
    """A job whose store is hosted by a server that ``kill_host`` closes, and nodes with
    failover (each its own client of the store)."""

    def __init__(self, min_nodes: int, max_nodes: int, join_timeout: float = 20) -> None:
        self.host = TCPStoreServer("127.0.0.1", 0)
        self.run_id = uuid.uuid4().hex[:8]
        self.settings = RendezvousSettings(
            self.run_id,
            min_nodes,
            max_nodes,
            join_timeout=join_timeout,
            last_call_timeout=0.3,
            heartbeat_interval=0.1,
            heartbeat_timeout=0.8,
            agent_hosted=True,
            majority=True,
        )
        self.nodes: list[DynamicRendezvous] = []

    def node(self) -> DynamicRendezvous:
        handler = DynamicRendezvous(
            TCPStoreClient("127.0.0.1", self.host.port, reconnect_timeout=0.5),
            self.settings,
            backend="test",
            endpoint=f"127.0.0.1:{self.host.port}",
            local_addr="127.0.0.1",
            failover=_failover(),
        )
        self.nodes.append(handler)
        return handler

    def close(self) -> None:
        # at once, as agents would: the node that hosts since the move waits for the others
        closing = [threading.Thread(target=h.shutdown) for h in self.nodes]
        for t in closing:
            t.start()
        for t in closing:
            t.join(30)
        self.host.close()


_rounds = RendezvousSuite._join_all


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Cluster]]:
    monkeypatch.setattr(dynamic, "find_free_port", lambda addr: 4242)
    made: list[_Cluster] = []

    class Made(_Cluster):
        def __init__(self, min_nodes: int, max_nodes: int, join_timeout: float = 20) -> None:
            super().__init__(min_nodes, max_nodes, join_timeout)
            made.append(self)

    yield Made
    for c in made:
        c.close()


def test_survivors_move_the_store_and_form_the_next_round(cluster: type[_Cluster]) -> None:
    job = cluster(2, 3)
    a, b, c = (job.node() for _ in range(3))
    first = _rounds([a, b, c])
    assert {i.group_world_size for i in first} == {3}
    again = _rounds([a, b], failed=True)  # one failure: the restart count is 1
    job.node()  # (a third node, so that the next round is of three)
    assert {i.restart_count for i in again} == {1}
    # c is gone with the host: a round of a, b and a newcomer, then the host dies
    c.leave("stopped")
    third = _rounds([a, b, job.nodes[-1]])
    assert {i.group_world_size for i in third} == {3}
    newcomer = job.nodes[-1]
    newcomer._stop.set()  # the newcomer dies too: its key expires, its port goes
    assert newcomer._failover is not None
    newcomer._failover.close()
    job.host.close()
    moved = _rounds([a, b])
    assert {i.group_world_size for i in moved} == {2}
    assert {i.round for i in moved} == {third[0].round + 1}  # the round number goes on
    assert {i.restart_count for i in moved} == {1}  # and the restart count


def test_a_minority_never_forms_a_round(cluster: type[_Cluster]) -> None:
    """Two of the last round's three nodes lost (not left): nnodes allows one node, but
    one of three is no majority: the survivor never forms a round, and says why."""
    job = cluster(1, 3, join_timeout=3)
    a, b, c = (job.node() for _ in range(3))
    _rounds([a, b, c])
    for lost in (b, c):
        lost._stop.set()  # their keys expire
    with pytest.raises(
        RendezvousError, match="1 of a majority of the last round's 3 nodes arrived"
    ):
        a.next_round(NodeInfo("r", 1))


def test_a_live_host_that_does_not_serve_is_not_moved_past(
    failovers: list[StoreFailover],
) -> None:
    """n0 is alive (its port takes connections) but still on the old store: n1 does not
    make itself the host."""
    candidates = _candidates(failovers)
    quick = StoreFailover(
        lambda: listen_socket("127.0.0.1", 0),
        lambda sock: TCPStoreServer(None, 0, listening=sock),
        lambda addr, port, patience: TCPStoreClient(
            addr, port, connect_timeout=1.0, request_timeout=max(patience, 0.5)
        ),
        patience=0.5,
    )
    try:
        with pytest.raises(StoreUnavailableError, match="does not host the store"):
            quick.elect(candidates, "n1", 3)
        assert not quick.serving
    finally:
        quick.close()


def test_the_reserved_port_is_released(failovers: list[StoreFailover]) -> None:
    port = failovers[0].port
    failovers[0].close()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


# -- hosts: only a few spread members may host; the others follow ------------------------


def _quick() -> StoreFailover:
    """A failover whose probe of a host waits half a second for it to serve."""
    return _failover(patience=0.5, least=0.5)


def test_elect_picks_the_first_host_reached_not_the_first_candidate(
    failovers: list[StoreFailover],
) -> None:
    candidates = _candidates(failovers)
    hosts = [candidates[2], candidates[1]]  # n0 votes but may not host
    stores: list[Store] = []
    try:
        # n2 elects itself (first of the hosts); n0, first candidate, follows it
        store2, endpoint2 = failovers[2].elect(candidates, "n2", 3, hosts)
        stores.append(store2)
        store0, endpoint0 = failovers[0].elect(candidates, "n0", 3, hosts)
        stores.append(store0)
        assert endpoint0 == endpoint2 == f"127.0.0.1:{failovers[2].port}"
        assert failovers[2].serving and not failovers[0].serving
        store0.set("k", "v")
        assert store2.get("k") == "v"  # one store
    finally:
        for s in stores:
            s.close()


def test_elect_counts_the_majority_among_candidates_not_hosts(
    failovers: list[StoreFailover],
) -> None:
    candidates = _candidates(failovers)
    failovers[0].close()
    failovers[1].close()  # n2 reaches 1 of 3, though it is the only host
    with pytest.raises(StoreUnavailableError, match="reaches 1 of the last round's 3 nodes"):
        failovers[2].elect(candidates, "n2", 3, [candidates[2]])
    assert not failovers[2].serving


def test_follow_moves_to_the_first_serving_host_reached(failovers: list[StoreFailover]) -> None:
    candidates = _candidates(failovers)
    failovers[0].close()  # n0 is gone: its port refuses
    stores: list[Store] = []
    follower = _failover()
    try:
        store1, endpoint1 = failovers[1].elect(candidates, "n1", 3, [candidates[1]])
        stores.append(store1)
        store, endpoint = follower.follow([candidates[0], candidates[1], candidates[2]])
        stores.append(store)
        assert endpoint == endpoint1 == f"127.0.0.1:{failovers[1].port}"
        assert not follower.serving  # a follower never hosts
        store1.set("k", "v")
        assert store.get("k") == "v"
    finally:
        for s in stores:
            s.close()
        follower.close()


def test_follow_does_not_pass_a_live_host_that_does_not_serve(
    failovers: list[StoreFailover],
) -> None:
    """n0 is alive (its port takes connections) but still on the old store: the follower
    does not go on to n1, which serves."""
    candidates = _candidates(failovers)
    stores: list[Store] = []
    follower = _quick()
    try:
        stores.append(failovers[1].elect(candidates, "n1", 3, [candidates[1]])[0])
        with pytest.raises(StoreUnavailableError, match="node n0 does not host the store"):
            follower.follow(candidates)
        assert not follower.serving and not failovers[0].serving
    finally:
        for s in stores:
            s.close()
        follower.close()


def test_follow_with_no_host_reached_is_unavailable(failovers: list[StoreFailover]) -> None:
    candidates = _candidates(failovers)
    for f in failovers:
        f.close()
    follower = _quick()
    try:
        with pytest.raises(StoreUnavailableError, match="no surviving member"):
            follower.follow(candidates)
        with pytest.raises(StoreUnavailableError, match="no surviving member"):
            follower.follow([])
        assert not follower.serving
    finally:
        follower.close()
