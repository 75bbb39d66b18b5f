"""The multi-host test kit: hosts as network namespaces (elastic_runner.testing.netns)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from elastic_runner.testing import netns
from elastic_runner.testing.netns import (
    NETNS_ETC,
    Cluster,
    Host,
    NetemUnavailable,
    NetnsUnavailable,
    namespace_processes,
    netns_unavailable_reason,
    sweep_leftovers,
)
from elastic_runner.testing.runner import wait_for

MakeCluster = Callable[..., Cluster]
PORT = 7000  # every cluster has its own namespaces: no clash between parallel tests

# An echo server: one thread per connection, so a held connection blocks no new one.
SERVER = r"""
import socket, sys, threading
def echo(conn):
    with conn:
        while data := conn.recv(1024):
            conn.sendall(data)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen()
print("ready", flush=True)
while True:
    threading.Thread(target=echo, args=(srv.accept()[0],), daemon=True).start()
"""

# Connects to HOST:PORT by name, sends a line and prints what happened as JSON.
CLIENT = r"""
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
t0 = time.monotonic()
try:
    with socket.create_connection((host, int(port)), timeout=float(sys.argv[2])) as conn:
        connect_s = time.monotonic() - t0
        conn.sendall(b"ping")
        reply = conn.recv(16)
    print(json.dumps({"ok": reply == b"ping", "connect_s": connect_s}))
except OSError as exc:
    print(json.dumps({"ok": False, "error": repr(exc), "after_s": time.monotonic() - t0}))
"""


@pytest.fixture
def require_netns() -> None:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")


def serve(host: Host, port: int = PORT) -> subprocess.Popen[str]:
    server = host.popen(
        [sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    assert server.stdout.readline() == "ready\n", f"the echo server on {host.name} did not start"
    return server


def connect(host: Host, target: str, timeout: float = 1.0) -> dict[str, Any]:
    """From ``host``, connect to ``target`` (``name:port``) and echo a line."""
    done = host.run([sys.executable, "-c", CLIENT, target, str(timeout)], timeout=30)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def python_on(host: Host, code: str) -> str:
    done = host.run([sys.executable, "-c", code], timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def ip_lines(*args: str) -> list[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=True
    ).stdout.splitlines()


def assert_all_gone(tag: str, pids: list[int]) -> None:
    """Nothing of cluster ``tag`` is left: no namespace, link, /etc/netns dir, process."""
    assert not [line for line in ip_lines("netns", "list") if line.startswith(tag)]
    assert not [line for line in ip_lines("-o", "link", "show") if tag in line]
    assert not (NETNS_ETC.exists() and [p for p in os.listdir(NETNS_ETC) if p.startswith(tag)])

    def dead(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(dead(pid) for pid in pids), timeout=5, what=f"{pids} to be gone")


def test_hosts_reach_each_other_by_name(netns_cluster: MakeCluster) -> None:
    cluster = netns_cluster(3)
    host0, host1, host2 = cluster.hosts
    assert len({h.address for h in cluster}) == 3
    assert all(ipaddress_in(h.address, str(cluster.subnet)) for h in cluster)
    serve(host1)
    for client in (host0, host2):
        result = connect(client, f"host1:{PORT}")
        assert result["ok"], result
    # The test itself (the root namespace) reaches a host through the bridge's address.
    with socket.create_connection((host1.address, PORT), timeout=5) as conn:
        conn.sendall(b"root")
        assert conn.recv(16) == b"root"


def ipaddress_in(address: str, subnet: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(address) in ipaddress.ip_network(subnet)


def test_each_host_has_its_name_and_its_own_etc_hosts(netns_cluster: MakeCluster) -> None:
    cluster = netns_cluster(names=["alpha", "beta"])
    code = "import socket; n = socket.gethostname(); print(n, socket.gethostbyname(n))"
    for host in cluster:
        assert python_on(host, code) == f"{host.name} {host.address}"
    # Debian's "127.0.1.1 <hostname>" on alpha only: beta still finds alpha's address.
    cluster.set_hosts_entry("alpha", "alpha", "127.0.1.1")
    assert cluster.hosts_entries("alpha")["alpha"] == "127.0.1.1"
    assert python_on(cluster["alpha"], code) == "alpha 127.0.1.1"
    lookup = "import socket; print(socket.gethostbyname('alpha'))"
    assert python_on(cluster["beta"], lookup) == cluster["alpha"].address
    # The machine's own /etc/hosts and hostname are untouched.
    assert "alpha" not in Path("/etc/hosts").read_text()
    assert socket.gethostname() != "alpha"


def test_popen_pid_is_the_command_itself(netns_cluster: MakeCluster) -> None:
    host = netns_cluster(1)[0]
    proc = host.popen(["sleep", "30"])
    # ip netns exec, unshare and sh all exec: the pid is sleep's, so signals reach it.
    wait_for(lambda: psutil.Process(proc.pid).cmdline() == ["sleep", "30"], timeout=5)
    assert [p.pid for p in host.processes()] == [proc.pid]


def test_a_name_added_later_resolves_in_a_running_process(netns_cluster: MakeCluster) -> None:
    cluster = netns_cluster(2)
    cluster.set_hosts_entry("host1", "host0", None)  # host0 "not in DNS yet" on host1
    waiter = cluster["host1"].popen(
        [
            sys.executable,
            "-c",
            "import socket, time\n"
            "try:\n"
            "    socket.gethostbyname('host0')\n"
            "except socket.gaierror as exc:\n"
            "    print('missing', exc.errno, flush=True)\n"
            "while True:\n"
            "    try:\n"
            "        print(socket.gethostbyname('host0'), flush=True)\n"
            "        break\n"
            "    except socket.gaierror:\n"
            "        time.sleep(0.02)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert waiter.stdout is not None
    assert waiter.stdout.readline() == f"missing {socket.EAI_NONAME}\n"
    cluster.set_hosts_entry("host1", "host0", cluster["host0"].address)
    out, _ = waiter.communicate(timeout=5)
    assert out == cluster["host0"].address + "\n"


def test_cut_stops_traffic_both_ways_and_restore_brings_it_back(
    netns_cluster: MakeCluster,
) -> None:
    cluster = netns_cluster(3)
    host0, host1, host2 = cluster.hosts
    serve(host0)
    serve(host1)
    held = socket.create_connection((host1.address, PORT), timeout=5)
    held.sendall(b"before")
    assert held.recv(16) == b"before"

    cluster.cut(host1)
    into = connect(host0, f"host1:{PORT}", timeout=0.5)
    out_of = connect(host1, f"host0:{PORT}", timeout=0.5)
    assert not into["ok"] and not out_of["ok"], (into, out_of)
    assert connect(host2, f"host0:{PORT}")["ok"]  # the others still talk
    held.settimeout(0.3)
    held.sendall(b"during")
    with pytest.raises(TimeoutError):
        held.recv(16)  # an established connection stalls, as on a real cut

    cluster.restore(host1)
    assert connect(host0, f"host1:{PORT}", timeout=5)["ok"]
    assert connect(host1, f"host0:{PORT}", timeout=5)["ok"]
    held.settimeout(10)  # TCP retransmits what was sent during the cut
    assert held.recv(16) == b"during"
    held.close()


def test_delay_adds_latency(netns_cluster: MakeCluster) -> None:
    cluster = netns_cluster(2)
    serve(cluster[1])
    before = connect(cluster[0], f"host1:{PORT}")["connect_s"]
    try:
        cluster.delay("host1", 100)
    except NetemUnavailable as exc:
        pytest.skip(f"netem unavailable: {exc}")
    # A connect is one round trip: 100 ms each way onto and off host1's link.
    delayed = connect(cluster[0], f"host1:{PORT}", timeout=5)["connect_s"]
    assert delayed >= 0.18 > before, (before, delayed)
    cluster.undelay("host1")
    assert connect(cluster[0], f"host1:{PORT}")["connect_s"] < 0.1


def test_netem_reason_names_what_is_missing(netns_cluster: MakeCluster) -> None:
    cluster = netns_cluster(1)
    reason = cluster.netem_unavailable_reason()
    if reason is None:
        cluster.delay(0, 1, loss_percent=1)
        cluster.undelay(0)
    else:
        assert "netem" in reason
        with pytest.raises(NetemUnavailable, match="netem"):
            cluster.delay(0, 10)


def test_freeze_and_thaw(netns_cluster: MakeCluster, tmp_path: Path) -> None:
    host = netns_cluster(1)[0]
    ticks = tmp_path / "ticks"
    ticker = host.popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "i = 0\n"
            "while True:\n"
            "    open(sys.argv[1], 'w').write(str(i)); i += 1; time.sleep(0.01)\n",
            str(ticks),
        ]
    )
    wait_for(lambda: ticks.exists() and ticks.read_text() not in ("", "0"), timeout=10)
    assert host.cluster.freeze(ticker) == [ticker.pid]
    assert psutil.Process(ticker.pid).status() == psutil.STATUS_STOPPED
    frozen_at = ticks.read_text()
    time.sleep(0.3)
    assert ticks.read_text() == frozen_at
    host.cluster.thaw(ticker.pid)
    wait_for(lambda: ticks.read_text() not in ("", frozen_at), timeout=5, what="ticks after thaw")

    # A whole tree; and one left frozen is still killed at teardown (the fixture fails
    # the test if anything survives).
    tree = host.popen(["sh", "-c", "sleep 30 & sleep 30; wait"])
    wait_for(lambda: len(psutil.Process(tree.pid).children()) == 2, timeout=5)
    pids = host.cluster.freeze(tree, tree=True)
    assert len(pids) == 3
    assert all(psutil.Process(pid).status() == psutil.STATUS_STOPPED for pid in pids)


def test_everything_is_removed_when_the_test_fails(require_netns: None) -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="the test failed"), Cluster(2) as cluster:
        tag = cluster.tag
        assert (NETNS_ETC / cluster[0].namespace / "hosts").exists()
        pids.append(cluster[0].popen(["sleep", "1000"]).pid)
        frozen = cluster[1].popen(["sleep", "1000"])
        wait_for(lambda: psutil.Process(frozen.pid).name() == "sleep", timeout=5)
        cluster.freeze(frozen)
        pids.append(frozen.pid)
        cluster.cut(1)
        # A process the kit did not start, detached from everything: found as a process
        # inside the host's namespace.
        cluster[1].run(["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 &"], check=True)
        wait_for(lambda: len(cluster[1].processes()) == 2, timeout=5)
        pids += [p.pid for p in cluster[1].processes() if p.pid != frozen.pid]
        assert len(pids) == 3
        raise RuntimeError("the test failed")
    assert_all_gone(tag, pids)
    assert cluster.leftovers() == []
    cluster.close()  # idempotent


CREATOR = r"""
import json, subprocess, sys
from elastic_runner.testing.netns import Cluster
cluster = Cluster(2).start()
sleeper = cluster[0].popen(["sleep", "1000"], stdout=subprocess.DEVNULL)
print(json.dumps({"tag": cluster.tag, "pid": sleeper.pid}), flush=True)
sys.stdin.read()  # wait to be killed: the cluster is never closed
"""


def test_sweep_removes_leftovers_of_a_dead_creator_only(require_netns: None) -> None:
    creator = subprocess.Popen(
        [sys.executable, "-c", CREATOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert creator.stdout is not None
        made = json.loads(creator.stdout.readline())
        tag, sleeper = made["tag"], made["pid"]
        assert int(tag[3:9], 16) == creator.pid  # the creator's pid is in the names
        sweep_leftovers()
        # Its creator lives: kept (a parallel test worker's cluster).
        assert len([n for n in ip_lines("netns", "list") if n.startswith(tag)]) == 2
        assert psutil.pid_exists(sleeper)
    finally:
        creator.kill()
        creator.communicate()
    sweep_leftovers()
    assert_all_gone(tag, [sleeper])


def test_sweep_tells_a_reused_pid_from_the_creator(require_netns: None) -> None:
    """A leftover whose creator's pid now belongs to another process is swept: the
    registry recorded the creator's start time."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        tag = f"{netns.PREFIX}{other.pid:06x}fff"
        record = {"tag": tag, "pid": other.pid, "create_time": 1.0, "subnet": "198.18.0.0/24"}
        leftover = NETNS_ETC / f"{tag}-host0"
        with netns._locked() as state:  # a closing cluster may remove an empty /etc/netns
            registry = state / f"{tag}.json"
            registry.write_text(json.dumps(record))
            leftover.mkdir(parents=True)
        # (A parallel test worker's sweep may get there first: check the outcome.)
        sweep_leftovers()
        assert not leftover.exists() and not registry.exists()
        # With the right start time, the creator is alive: nothing is swept.
        record["create_time"] = psutil.Process(other.pid).create_time()
        registry.write_text(json.dumps(record))
        sweep_leftovers()
        assert registry.exists()
        other.kill()
        other.wait()
        sweep_leftovers()
        assert not registry.exists()
    finally:
        other.kill()
        other.wait()


def test_namespace_processes_of_a_missing_namespace() -> None:
    assert namespace_processes("erk-no-such-namespace") == []


def test_names_are_checked() -> None:
    with pytest.raises(ValueError, match="not unique"):
        Cluster(names=["a", "A"])
    with pytest.raises(ValueError, match="2 hosts but 1 names"):
        Cluster(2, names=["a"])
    with pytest.raises(ValueError, match="hostname"):
        Cluster(names=["bad name"])
    with pytest.raises(ValueError, match="1 to 99"):
        Cluster(0)


def test_without_namespaces_the_fixture_skips_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, netns_cluster: MakeCluster
) -> None:
    monkeypatch.setattr(netns, "netns_unavailable_reason", lambda: "no ip here")
    with pytest.raises(NetnsUnavailable, match="no ip here"):
        Cluster(1).start()
    with pytest.raises(pytest.skip.Exception, match="network namespaces unavailable: no ip here"):
        netns_cluster(1)


def test_probe_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "not root" in (netns._probe() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert netns._probe() == "`ip` not found (install iproute2)"
