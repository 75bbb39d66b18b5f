"""Attacks on the built-in TCP store of a running job, through ``elastic-run`` on
loopback: an attacker (raw sockets in this process) who does not have the token, one who
floods the store before ``hello``, one who opens more idle connections than the store
takes (against an agent with ``ulimit -n 1024``), and one who has the token and sends
NaN times and keys that are not strings. Each time the job survives: the agents' workers
run on and the job ends with exit 0, and the agent hosting the store logs a few lines at
most. Plus the store open to the network without a token: a loud warning, or with
``rdzv.token_required=true`` an error."""

from __future__ import annotations

import contextlib
import json
import math
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from elastic_runner.testing.runner import wait_for
from tests.conftest import ElasticRunner, free_port, probe_job
from tests.test_store import write_test_ca

FAST = [
    "rdzv.heartbeat_interval=0.2",
    "rdzv.heartbeat_timeout=1.5",
    "rdzv.join_timeout=30",
    "rdzv.last_call_timeout=0.5",
]
TOKEN = "e2e-attack-token"

#: A worker that records that it runs, then waits for the test to say "finish".
WORKER = """
import os, sys, time
out = sys.argv[1]
open(os.path.join(out, f"started_{os.environ['RANK']}"), "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(os.path.join(out, "finish")) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


# -- the attacker's tools ---------------------------------------------------------------------


def _frame(message: object) -> bytes:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def _replies(sock: socket.socket, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every frame the store sends until it closes the connection (or goes quiet)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    out = []
    while len(data) >= 4:
        (size,) = struct.unpack(">I", data[:4])
        out.append(json.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    return out


def _ask(sock: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
    sock.sendall(_frame(message))
    sock.settimeout(10)
    header = sock.recv(4, socket.MSG_WAITALL)
    answer: dict[str, Any] = json.loads(
        sock.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL)
    )
    return answer


def _store_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "tcp store" in line]


class Job:
    """Agents of one job on loopback, with the token; the first hosts the store."""

    def __init__(
        self,
        elastic_run: ElasticRunner,
        tmp_path: Path,
        nnodes: str = "2",
        token: tuple[str, ...] = (f"rdzv.token={TOKEN}",),
    ) -> None:
        self.elastic_run = elastic_run
        self.run_id = f"attack-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.nnodes = nnodes
        self.token = token
        self.out = tmp_path / "out"
        self.out.mkdir(exist_ok=True)
        self.worker = tmp_path / "worker.py"
        self.worker.write_text(WORKER)
        self.agents: list[subprocess.Popen[str]] = []
        self.run_dirs: list[Path] = []

    def start(
        self, *overrides: str, job: list[str] | None = None, **popen: Any
    ) -> subprocess.Popen[str]:
        host = not self.agents
        proc, run_dir, _ = self.elastic_run.popen(
            *(job or [f"job.entrypoint={self.worker}", f"job.args=[{self.out}]"]),
            "rdzv=tcp",
            f"rdzv.endpoint=127.0.0.1:{self.port}",
            f"rdzv.is_host={str(host).lower()}",
            f"nnodes={self.nnodes}",
            *self.token,
            *FAST,
            *overrides,
            run_id=self.run_id,
            **popen,
        )
        self.agents.append(proc)
        self.run_dirs.append(run_dir)
        if host:
            wait_for(lambda: _listening(self.port), what="the store listens")
        return proc

    @property
    def host(self) -> psutil.Process:
        return psutil.Process(self.agents[0].pid)

    def running(self, workers: int) -> None:
        wait_for(lambda: len(list(self.out.glob("started_*"))) == workers, what="workers")

    def settled(self) -> None:
        """Wait until each agent holds its two connections to the store (its watcher's
        and its heartbeat's): the second opens at the first heartbeat after the round."""

        def held(proc: subprocess.Popen[str]) -> int:
            with contextlib.suppress(psutil.Error):
                conns = psutil.Process(proc.pid).net_connections(kind="tcp")
                return sum(1 for c in conns if c.raddr and c.raddr.port == self.port)
            return 0

        wait_for(lambda: all(held(p) >= 2 for p in self.agents), what="the agents' connections")

    def finish(self) -> list[tuple[int, str]]:
        (self.out / "finish").touch()
        results = []
        for proc in self.agents:
            _, err = proc.communicate(timeout=60)
            results.append((proc.returncode, err))
        return results

    def rounds(self) -> list[int]:
        return [
            (d / "events.jsonl").read_text().count("torchelastic.worker.status.RENDEZVOUS")
            for d in self.run_dirs
        ]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def job(elastic_run: ElasticRunner, tmp_path: Path) -> Iterator[Job]:
    made = Job(elastic_run, tmp_path)
    yield made
    (made.out / "finish").touch()
    for proc in made.agents:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=30)


class Peak:
    """The highest RSS of a process while in the ``with`` block."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.rss = process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(psutil.Error):
                self.rss = max(self.rss, self.process.memory_info().rss)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- (a) without the token -------------------------------------------------------------------


def test_without_the_token_nothing_can_be_read_or_written(job: Job, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    job.token = (f"rdzv.token_file={secret}",)  # the token from a file, not the command line
    job.start()
    job.start()
    job.running(2)
    failed = f"rdzv/{job.run_id}/failed"
    attempts: list[bytes] = [
        _frame({"id": 1, "op": "scan", "args": {"prefix": ""}}),
        _frame({"id": 1, "op": "set", "args": {"key": failed, "value": "pwned"}}),
        _frame(
            {
                "id": 1,
                "op": "compare_set",
                "args": {"key": failed, "expected": None, "desired": "pwned"},
            }
        ),
    ]
    for token in ["", "wrong", None, 0, [TOKEN], {"$ne": ""}, TOKEN[:-1], TOKEN + " ", TOKEN * 2]:
        hello = _frame({"id": 0, "op": "hello", "token": token})
        attempts.append(hello + _frame({"id": 1, "op": "scan", "args": {"prefix": ""}}))
        write = {"id": 1, "op": "set", "args": {"key": failed, "value": "pwned"}}
        attempts.append(hello + _frame(write))
    attempts.append(_frame({"id": 0, "op": "hello"}))  # no token at all
    for attempt in attempts:
        with socket.create_connection(("127.0.0.1", job.port)) as s:
            s.sendall(attempt)
            replies = _replies(s)
        assert all(not r.get("ok") for r in replies), replies  # never an answer
        assert job.run_id not in json.dumps(replies)  # nothing of the job leaks
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert job.rounds() == [1, 1]  # nothing re-formed
    assert len(_store_lines(results[0][1])) <= 2, results[0][1]


def test_over_tls_the_job_forms_and_a_plain_client_gets_nothing(job: Job, tmp_path: Path) -> None:
    files = write_test_ca(tmp_path / "tls")
    tls = (f"rdzv.ca_cert={files.ca}", f"rdzv.cert={files.cert}", f"rdzv.key={files.key}")
    job.start(*tls)
    job.start(f"rdzv.ca_cert={files.ca}")  # checks the store; needs no certificate itself
    job.running(2)
    with socket.create_connection(("127.0.0.1", job.port)) as s:
        s.sendall(_frame({"id": 0, "op": "hello", "token": TOKEN}))  # right token, no TLS
        assert _replies(s) == []
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert job.rounds() == [1, 1]


def test_a_store_open_to_the_network_without_a_token_is_a_loud_warning_or_an_error(
    elastic_run: ElasticRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ELASTIC_RUNNER_RDZV_TOKEN", raising=False)
    hello = ["+job=hello", "job.nproc_per_node=1", "rdzv=tcp", "nnodes=1", *FAST]
    run = elastic_run(*hello, f"rdzv.endpoint=127.0.0.1:{free_port()}")
    assert run.returncode == 0, run.stderr
    [warning] = [line for line in run.stderr.splitlines() if "has no token" in line]
    assert "WARNING: the rendezvous store (port " in warning  # behind the log prefix
    assert "rdzv.token_required=true makes this an error" in warning
    on_loopback = elastic_run(
        *hello, f"rdzv.endpoint=127.0.0.1:{free_port()}", "rdzv.bind=127.0.0.1"
    )
    assert on_loopback.returncode == 0 and "has no token" not in on_loopback.stderr
    strict = elastic_run(
        *hello, f"rdzv.endpoint=127.0.0.1:{free_port()}", "rdzv.token_required=true"
    )
    assert strict.returncode == 2, strict.stderr
    assert strict.stderr.strip().splitlines() == [
        "elastic-run: error: rdzv.token_required=true: no token on this node: set rdzv.token, "
        "rdzv.token_file or $ELASTIC_RUNNER_RDZV_TOKEN (or rdzv.bind=127.0.0.1 for a job on "
        "this machine only)"
    ]


# -- (b) a flood of large frames before hello ----------------------------------------------------


def test_a_flood_of_large_frames_before_hello_costs_the_host_nothing(job: Job) -> None:
    job.start()
    job.start()
    job.running(2)
    host = job.host
    before = host.memory_info().rss
    frame = struct.pack(">I", 16 << 20) + b"x" * ((16 << 20) - 1)  # all but its last byte

    def flood() -> None:
        with socket.socket() as s:
            s.settimeout(20)
            try:
                s.connect(("127.0.0.1", job.port))
                s.sendall(frame)
                time.sleep(2)  # hold it: the server must not be waiting for the rest
            except OSError:
                pass  # closed on us: what we hope for

    with Peak(host) as peak:
        threads = [threading.Thread(target=flood) for _ in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    time.sleep(1)
    after = host.memory_info().rss
    grew, kept = (peak.rss - before) / 2**20, (after - before) / 2**20
    assert grew < 100, f"the host agent's RSS grew by {grew:.0f} MiB"
    assert kept < 20, f"the host agent kept {kept:.0f} MiB"
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert job.rounds() == [1, 1]
    assert len(_store_lines(results[0][1])) <= 3, results[0][1]


# -- (c) more idle connections than the store takes, on an agent with ulimit -n 1024 ----------


def _ulimit_1024() -> None:
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )


def test_more_idle_connections_than_the_cap_do_not_crash_the_host(job: Job) -> None:
    job.start(preexec_fn=_ulimit_1024)
    job.start()
    job.running(2)
    # A node that needs a new connection during the flood waits behind it in the kernel's
    # queue (accepting pauses past four times the cap of connections without hello, to
    # spare a burst of agents whose hellos the store is slow to read): what is tested is
    # a job already running, whose nodes hold their connections.
    job.settled()
    socks = []
    for i in range(1100):  # more than the 1024 descriptors the host agent may open
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", job.port))
        socks.append(s)
        if i % 50 == 49:
            time.sleep(0.02)  # paced: the kernel's accept queue is not the point here
    time.sleep(2)
    assert job.agents[0].poll() is None, job.agents[0].communicate()[1][-3000:]
    assert job.host.num_fds() < 1024 // 2 + 64
    for s in socks:
        s.close()
    results = job.finish()
    assert [code for code, _ in results] == [0, 0], results
    assert job.rounds() == [1, 1]
    lines = _store_lines(results[0][1])
    assert len(lines) <= 3, lines
    assert "Traceback" not in results[0][1]


# -- (d) with the token: NaN times and keys that are not strings --------------------------------


def test_nan_times_and_corrupt_keys_are_refused_and_lost_nodes_still_noticed(job: Job) -> None:
    job.nnodes = "2:3"
    probe = probe_job(job.out, "--until-world", "2", "--after-world", "3")
    agents = [job.start(job=probe)]
    agents += [job.start(job=probe) for _ in range(2)]
    wait_for(lambda: len(list(job.out.glob("*_w3.json"))) == 3, what="three nodes")
    p = f"rdzv/{job.run_id}/"
    poison = [
        {"op": "set", "args": {"key": p + "x", "value": "v", "ttl": math.nan}},
        {"op": "refresh", "args": {"key": p + "round", "ttl": math.inf}},
        {
            "op": "compare_set",
            "args": {"key": p + "y", "expected": None, "desired": "v", "ttl": -1},
        },
        {"op": "wait", "args": {"keys": [p + "never"], "timeout": math.nan}},
        {"op": "wait_for_change", "args": {"prefix": p, "version": 0, "timeout": -math.inf}},
        {"op": "set", "args": {"key": 123, "value": "corrupt key type"}},
        {"op": "set", "args": {"key": [p, "alive"], "value": "1"}},
        {"op": "multi_set", "args": {"items": {p + "alive/ghost": {"nested": 1}}}},
        {"op": "add", "args": {"key": p + "restarts", "amount": math.nan}},
    ]
    with socket.create_connection(("127.0.0.1", job.port)) as s:
        assert _ask(s, {"id": 0, "op": "hello", "token": TOKEN})["ok"]
        for i, message in enumerate(poison):
            answer = _ask(s, {"id": i + 1, **message})
            assert answer["ok"] is False and answer.get("invalid") is True, (message, answer)
            assert answer["id"] == i + 1
        # nothing of it reached the store: its keys are all strings still
        found = _ask(s, {"id": 99, "op": "scan", "args": {"prefix": ""}})
        assert found["ok"] and not any("ghost" in k or k == p + "x" for k in found["result"][0])
    cpu0 = sum(job.host.cpu_times()[:2])
    time.sleep(1.0)
    assert sum(job.host.cpu_times()[:2]) - cpu0 < 0.5  # no loop spinning on a NaN timer
    victim = agents[2]
    victim.kill()
    survivors = agents[:2]
    errs = [proc.communicate(timeout=30)[1] for proc in survivors]
    assert [proc.returncode for proc in survivors] == [0, 0], errs
    assert len(list(job.out.glob("*_w2.json"))) == 2  # re-formed without the lost node
    assert any("was lost" in err for err in errs), errs
    assert not any("unreachable" in err for err in errs), errs
    assert len(_store_lines(errs[0])) <= 1, errs[0]  # one line for all the refusals
    victim.communicate(timeout=10)
