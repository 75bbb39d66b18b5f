"""Rendezvous at scale: N participants, the store in its own process, K client processes.

A benchmark, not a test.
For each backend and each N (default 64, 128, ..., 8,192; ``--sizes``):

* the store runs in its OWN process, fresh for each N: ``tcp``: elastic-run's
  ``TCPStoreServer`` (``bench/_scale_store.py``; connection caps raised to the open-file
  limit); ``etcd``: a real ``etcd`` on a temp data dir and free ports, listening on
  127.0.0.1..8; ``redis``: a real ``redis-server`` (the ``elastic-runner-redis`` plugin's
  ``RedisStore``), on 127.0.0.1..8; ``torch``: torch's libuv ``TCPStore`` in a process of
  ``--torch-python``, with torch's ``DynamicRendezvousHandler`` + ``C10dRendezvousBackend``
  as participants (skipped when torch does not import there);
* N participants are spread over K client processes (``--clients``; default 2 below
  N = 1,024, else 4, and on redis at most 128 a process; ``bench/_scale_client.py``),
  one thread each, each with its own store client as a real agent has (``tcp``: from
  its own source address 127.1.x.y, so no ephemeral-port exhaustion; ``etcd``/``redis``:
  to one of the 8 addresses the server listens on), all calling ``next_round`` at one
  wall-clock time, with min = max = N, ``last_call_timeout`` 0 (torch: 1 ms, the least
  it takes), heartbeat every ``--heartbeat-interval`` s (2) and a heartbeat timeout of
  3 intervals.

Per N it reports: the time from the common start to each participant having the round
(p50, p99, max over participants: the round is complete for all at max); the store's
requests and bytes (in + out) while the round formed; requests and bytes per heartbeat
period in steady state (all in, nothing changing; over ``--periods`` periods after one
period and a second to settle); the time to re-form after adding 1% (k = max(1, N/100))
more participants (every participant's min = max becomes N + k first, so the round
re-forms exactly once, with all N + k: the running nodes see nodes waiting and regroup)
and then after killing k of the N + k (min = max back to N first; the dead stop their
heartbeats and watches and their connections are cut, nothing written: the others notice
when their liveness keys expire, after the heartbeat timeout; torch has no watch: its
agents re-form when their workers fail, so its survivors are told at the kill), each
until every participant has the new round; the store process's CPU seconds over the size
(start to end) and its RSS at the end; the load average at the start; the listen queue
overflows of the machine during the size (``/proc/net/netstat``). Then, per backend, the
log-log slope (least squares) of bytes per round and per heartbeat period against N.

How the store counts: ``tcp``: the server's own counters (frames read and written);
``etcd``: its ``/metrics`` (gRPC calls started; gRPC bytes received + sent, which is
what its JSON gateway forwards); ``redis``: ``INFO`` (client commands: EVALSHA,
SUBSCRIBE, ...; ``total_net_input/output_bytes``); ``torch``: no request counter; bytes
are the store process's read()+write() syscall bytes (``/proc/<pid>/io``, libuv's
sockets), "-" for requests.

The first round may take up to ``--budget`` s (600), each re-form up to
``--phase-budget`` s (default: the budget; a re-form that does not complete in time is
noted and the size goes on). Each backend stops after the first N that took longer than
the budget in all (or whose first round failed or ran out of time);
the larger ones are listed as skipped, as are sizes this machine cannot hold (``tcp``
needs 3 connections per participant in one process: the open-file hard limit).

Targets (exit 1 when one is missed or a run failed): ``tcp`` round (max) <= 5 s at
N = 1,024 and <= 30 s at N = 4,096; ``tcp`` bytes per round and per heartbeat period
grow with a log-log slope <= 1.2 (over >= 3 sizes); ``etcd`` round within 2x of ``tcp``
at every N <= 1,024 both ran. A target whose N was not run is "n/a".

Reproduce from the repository root (``etcd``, ``redis-server`` on PATH; torch pinned:
``python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0``)::

    .venv/bin/python bench/scale.py --quick                     # ~20 s: 32, 64 on tcp
    .venv/bin/python bench/scale.py                             # tcp, 64 .. 8,192
    .venv/bin/python bench/scale.py --backends tcp,etcd,redis,torch --json
    .venv/bin/python bench/scale.py --sizes 1024 --profile /tmp/store.prof   # tcp profile
    .venv/bin/python bench/scale.py --backends etcd --sizes 1024 --profile /tmp/etcd.pprof
    # the run behind the published table (tcp first, then the others merged in):
    .venv/bin/python bench/scale.py --phase-budget 180 --save /tmp/scale_tcp.json
    .venv/bin/python bench/scale.py --backends etcd,redis,torch --budget 300 \
        --phase-budget 120 --merge /tmp/scale_tcp.json --save /tmp/scale_all.json

torch runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with its default (rank 0 serves
the workers' store and publishes its address in the first round only) a node that joins
a later round waits for that address forever, which the +1% phase hits on torch 2.13.
Its participants' settings are swapped between phases the same way (``_settings`` of the
handler, its state holder and its op executor). Per size, the store's requests by
operation and bytes during the round and each re-form are listed under the table
(``tcp``; ``etcd`` by gRPC method), and a JSON line per size goes to stderr as it ends.

Progress goes to stderr. Every process it starts runs in its own session and is killed
with it at the end, on failure and on Ctrl-C/SIGTERM too; leftovers are swept by the temp
dir in their command line, which is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import queue
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import pprof_top
import psutil
from _procs import sweep, torch_version  # bench/ is on the path: scripts run from it

from elastic_runner.testing.runner import free_port

BENCH_DIR = Path(__file__).resolve().parent
CLIENT = BENCH_DIR / "_scale_client.py"
STORE = BENCH_DIR / "_scale_store.py"
DEFAULT_TORCH_PYTHON = Path("/tmp/torchvenv/bin/python")
DEFAULT_SIZES = [64 << i for i in range(8)]  # 64 .. 8,192
BACKENDS = ("tcp", "etcd", "redis", "torch")
#: Most participants in one client process on redis (see ``Size.run``).
PER_REDIS_CLIENT = 128
#: Loopback addresses etcd and redis listen on (clients spread over them).
SPREAD = 8
#: Connections a participant holds on the tcp store: its threads (main, heartbeat,
#: watcher) share a pool of connections, two of them most of the time (a third for a
#: moment when a request comes while both are in use; past the cap the store answers
#: "busy" and the client tries again).
CONNS_PER_PARTICIPANT = 2


class RunError(RuntimeError):
    """A run did not go as the scenario expects."""


def log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def listen_overflows() -> int:
    """The machine's TcpExt ListenOverflows (a full accept queue dropped a SYN/ACK)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("TcpExt:"):
                row = dict(zip(names.split()[1:], values.split()[1:], strict=True))
                return int(row["ListenOverflows"])
    return 0


# -- processes --------------------------------------------------------------------------


class Proc:
    """A child in its own session whose stdout lines are JSON answers (read by a thread)."""

    def __init__(
        self,
        argv: list[str],
        log_path: Path,
        *,
        lines: bool = True,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115  (closed in kill)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if lines else subprocess.DEVNULL,
            stdout=subprocess.PIPE if lines else subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
            cwd=BENCH_DIR,
            env=None if env is None else {**os.environ, **env},
        )
        self.pid = self.proc.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        if lines:
            assert self.proc.stdout is not None
            threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self._lines.put(raw.decode(errors="replace"))
        self._lines.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise RunError(f"process {self.pid} is gone ({exc}): {self.tail()}") from None

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RunError(f"process {self.pid}: no answer within {timeout:g} s") from None
        if line is None:
            raise RunError(f"process {self.pid} exited: {self.tail()}")
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError:
            raise RunError(f"process {self.pid} said {line[:200]!r}") from None
        if "error" in message:
            raise RunError(f"process {self.pid}: {message['error']}")
        return message

    def ask(self, line: str, timeout: float) -> dict[str, Any]:
        self.send(line)
        return self.answer(timeout)

    def tail(self, size: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-size:].decode(errors="replace")
        return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        self._log.close()


@dataclass
class StoreStats:
    requests: int | None
    bytes_in: int
    bytes_out: int
    cpu_s: float
    rss: int
    by_op: dict[str, int] = field(default_factory=dict)


class Store:
    """A store server process for one backend; ``stats`` reads its counters."""

    backend = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.proc: Proc | None = None
        self.port = 0
        self.host = "127.0.0.1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def usage(self) -> tuple[float, int]:
        """CPU seconds (user + system) and RSS (bytes) of the store process."""
        try:
            p = psutil.Process(self.pid)
            cpu = p.cpu_times()
            return cpu.user + cpu.system, p.memory_info().rss
        except psutil.Error:
            return math.nan, 0

    def counters(self) -> tuple[int | None, int, int]:
        raise NotImplementedError

    #: Requests by operation at the last ``counters`` (tcp; etcd: by gRPC method).
    by_op: dict[str, int] = {}

    def stats(self) -> StoreStats:
        requests, bytes_in, bytes_out = self.counters()
        cpu, rss = self.usage()
        return StoreStats(requests, bytes_in, bytes_out, cpu, rss, dict(self.by_op))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()


class TcpStore(Store):
    backend = "tcp"

    def __init__(self, tmp: Path, profile: str | None) -> None:
        super().__init__(tmp)
        argv = [sys.executable, str(STORE), "tcp", profile or "-", str(tmp)]
        self.proc = Proc(argv, tmp / "store.log")
        first = self.proc.answer(60)
        self.port = int(first["port"])
        self.max_connections = int(first["max_connections"])

    def counters(self) -> tuple[int | None, int, int]:
        assert self.proc is not None
        s = self.proc.ask("stats", 60)
        self.by_op = {str(k): int(v) for k, v in s["by_op"].items()}
        # connections the store closed or refused, by reason, beside the requests
        self.by_op.update({f"refused ({k})": int(v) for k, v in s.get("refused", {}).items()})
        if "loop_lag_s" in s:  # its worst since the last reading, in ms
            self.by_op["loop lag ms (max)"] = int(1000 * float(s["loop_lag_s"]))
        return int(s["requests"]), int(s["bytes_in"]), int(s["bytes_out"])

    def profile(self) -> None:
        assert self.proc is not None
        self.proc.ask("profile", 120)


class TorchStore(Store):
    backend = "torch"

    def __init__(self, tmp: Path, python: str) -> None:
        super().__init__(tmp)
        self.proc = Proc([python, str(STORE), "torch", "-", str(tmp)], tmp / "store.log")
        self.port = int(self.proc.answer(120)["port"])

    def counters(self) -> tuple[int | None, int, int]:
        io = psutil.Process(self.pid).io_counters()
        return None, int(io.read_chars), int(io.write_chars)


class EtcdStore(Store):
    backend = "etcd"

    def __init__(self, tmp: Path, profile: str | None = None) -> None:
        super().__init__(tmp)
        from elastic_runner.testing.etcd import etcd_binary

        binary = etcd_binary()
        if binary is None:
            raise RunError("no etcd binary (apt-get install etcd-server)")
        self.port, peer_port = free_port(), free_port()
        clients = ",".join(f"http://127.0.0.{i + 1}:{self.port}" for i in range(SPREAD))
        peer = f"http://127.0.0.1:{peer_port}"
        argv = [
            binary, "--name", "bench", "--data-dir", str(tmp / "etcd"),
            "--listen-client-urls", clients,
            "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}", "--log-level", "error",
        ]  # fmt: skip
        if profile:
            argv.append("--enable-pprof")
        self.proc = Proc(argv, tmp / "store.log", lines=False)
        self._url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while True:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self._url + "/version", timeout=1) as answer,
            ):
                if answer.status == 200:
                    break
            if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                raise RunError(f"etcd did not start: {self.proc.tail()}")
            time.sleep(0.05)

    def start_profile(self, seconds: float, path: Path) -> threading.Thread:
        """A thread saving etcd's CPU profile of the next ``seconds`` to ``path``."""

        def fetch() -> None:
            url = f"{self._url}/debug/pprof/profile?seconds={max(1, round(seconds))}"
            try:
                with urllib.request.urlopen(url, timeout=seconds + 60) as answer:
                    path.write_bytes(answer.read())
            except OSError as exc:
                log(f"etcd profile: {exc}")

        thread = threading.Thread(target=fetch, daemon=True)
        thread.start()
        return thread

    def counters(self) -> tuple[int | None, int, int]:
        with urllib.request.urlopen(self._url + "/metrics", timeout=30) as answer:
            text = answer.read().decode()
        requests, received, sent = 0.0, 0.0, 0.0
        by_op: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("grpc_server_started_total{"):
                count = float(line.rsplit(" ", 1)[1])
                requests += count
                method = re.search(r'grpc_method="([^"]+)"', line)
                if method and count:
                    name = method.group(1)
                    by_op[name] = by_op.get(name, 0) + int(count)
            elif line.startswith("etcd_network_client_grpc_received_bytes_total "):
                received = float(line.rsplit(" ", 1)[1])
            elif line.startswith("etcd_network_client_grpc_sent_bytes_total "):
                sent = float(line.rsplit(" ", 1)[1])
        self.by_op = by_op
        return int(requests), int(received), int(sent)


#: Commands a client sends to Redis (what the scripts call inside is not counted).
_REDIS_CLIENT_COMMANDS = ("evalsha", "eval", "script", "subscribe", "unsubscribe", "hello",
                          "ping", "client")  # fmt: skip


class RedisStore(Store):
    backend = "redis"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise RunError("no redis-server (apt-get install redis-server)")
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.port = free_port()
        binds = " ".join(f"127.0.0.{i + 1}" for i in range(SPREAD))
        argv = [exe, "--port", str(self.port), "--bind", binds, "--save", "",
                "--appendonly", "no", "--dir", str(tmp), "--maxclients", str(soft - 64),
                "--tcp-backlog", "4096"]  # fmt: skip
        self.proc = Proc(argv, tmp / "store.log", lines=False)
        self._redis = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                self._redis.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                    raise RunError(f"redis-server did not start: {self.proc.tail()}") from None
                time.sleep(0.05)

    def counters(self) -> tuple[int | None, int, int]:
        stats = self._redis.info("stats")
        commands = self._redis.info("commandstats")
        requests = sum(
            int(v["calls"])
            for k, v in commands.items()
            if k.removeprefix("cmdstat_").split("|")[0] in _REDIS_CLIENT_COMMANDS
        )
        return requests, int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._redis.close()
        super().stop()


# -- one size ---------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    n: int
    status: str = "ok"  # ok, over budget, failed, skipped
    note: str = ""
    #: etcd: how the participants reached it (grpc or http, the JSON gateway).
    api: str = ""
    clients: int = 0
    load1: float = 0.0
    round_p50: float | None = None
    round_p99: float | None = None
    round_max: float | None = None
    round_requests: int | None = None
    round_bytes: int | None = None
    period_requests: float | None = None
    period_bytes: float | None = None
    k: int = 0
    reform_plus: float | None = None
    reform_minus: float | None = None
    store_cpu_s: float | None = None
    store_rss_mib: float | None = None
    listen_overflows: int = 0
    wall_s: float = 0.0
    #: CPU seconds of all client processes while the first round formed.
    clients_round_cpu_s: float | None = None
    #: CPU the rest of the machine used while the first round formed (everything but the
    #: store and the clients), in % of all cores: how noisy the measurement was. (The
    #: load average counts the participants' own runnable threads, so it says less.)
    others_round_cpu_pct: float | None = None
    round_by_op: dict[str, int] = field(default_factory=dict)
    #: The store's requests by operation per heartbeat period in steady state.
    period_by_op: dict[str, int] = field(default_factory=dict)
    #: The store's requests and bytes (in + out) during the +1% and -1% re-forms.
    plus_requests: int | None = None
    plus_bytes: int | None = None
    plus_by_op: dict[str, int] = field(default_factory=dict)
    minus_requests: int | None = None
    minus_bytes: int | None = None
    minus_by_op: dict[str, int] = field(default_factory=dict)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Size:
    """One backend at one N: a store, K clients, the phases."""

    def __init__(self, backend: str, n: int, args: argparse.Namespace, tmp: Path) -> None:
        self.backend, self.n, self.args, self.tmp = backend, n, args, tmp
        self.store: Store | None = None
        self.clients: list[Proc] = []
        self.row = Row(backend, n)

    def _start_store(self) -> Store:
        if self.backend == "tcp":
            return TcpStore(self.tmp, self.args.profile)
        if self.backend == "torch":
            return TorchStore(self.tmp, self.args.torch_python)
        if self.backend == "etcd":
            return EtcdStore(self.tmp, self.args.profile)
        return RedisStore(self.tmp)

    def _all(self, line: str, timeout: float) -> list[dict[str, Any]]:
        for c in self.clients:
            c.send(line)
        return [c.answer(timeout) for c in self.clients]

    def _each(self, lines: list[str], timeout: float) -> list[dict[str, Any]]:
        for c, line in zip(self.clients, lines, strict=True):
            c.send(line)
        return [c.answer(timeout) for c in self.clients]

    def _wait(self, since: float, world: int, what: str, first: bool = False) -> list[float]:
        budget = self.args.budget if first else self.args.phase_budget or self.args.budget
        answers = self._all(f"wait {since!r} {budget} {world}", budget + 120)
        errors = [e for a in answers for e in a["errors"]]
        if errors and all(e.startswith("RendezvousTimeoutError") for e in errors):
            # the participants' own join timeout (= the budget) ran out
            raise TimeoutError(f"{what}: join timed out ({budget:g} s) in some participants")
        if errors:
            count = sum(a["error_count"] for a in answers)
            raise RunError(f"{what}: {count} participant(s) failed, e.g. {errors[0]}")
        if any(a["timeout"] for a in answers):
            missing = sum(a["missing"] for a in answers)
            raise TimeoutError(f"{what}: {missing} of {world} without it after {budget:g} s")
        return [t for a in answers for t in a["times"]]

    def run(self) -> Row:
        row, n, args = self.row, self.n, self.args
        k_clients = args.clients or (2 if n < 1024 else 4)
        if self.backend == "redis" and not args.clients:
            # redis-py spends about 2 ms of CPU a request here: 256 participants in one
            # process were bound by its interpreter, answered late, and each looked again
            # (N=512 on 2 processes: 23 to 36 s, 36 to 53 requests a node, 26 to 53
            # CPU-s in the clients; on 4: 7.3 s, 20 requests, 9.7 CPU-s). A real agent
            # has a process of its own.
            k_clients = max(k_clients, -(-n // PER_REDIS_CLIENT))
        row.clients = k_clients
        if self.backend == "etcd":
            row.api = args.etcd_api
        row.load1 = os.getloadavg()[0]
        row.k = k = max(1, round(n / 100))
        started = time.monotonic()
        overflows = listen_overflows()
        self.store = store = self._start_store()
        if isinstance(store, TcpStore) and CONNS_PER_PARTICIPANT * (n + k) > store.max_connections:
            row.status = "skipped"
            row.note = (
                f"needs {CONNS_PER_PARTICIPANT * (n + k)} connections in one process; the "
                f"open-file hard limit allows {store.max_connections}"
            )
            return row
        interval = args.heartbeat_interval
        base = {
            "backend": self.backend, "host": store.host, "port": store.port,
            "run_id": uuid.uuid4().hex[:8], "budget": args.budget, "last_call": 0.0,
            "heartbeat_interval": interval, "heartbeat_timeout": 3 * interval,
            "torch_monitor_interval": args.torch_monitor_interval, "spread": SPREAD,
            "source_prefix": "127.1", "min_nodes": n, "max_nodes": n, "marker": str(self.tmp),
            "etcd_api": args.etcd_api,
        }  # fmt: skip
        python = args.torch_python if self.backend == "torch" else sys.executable
        # torch 2.13's rank 0 serves the workers' store and publishes its address in the
        # first round only: a node joining a later round waits for it forever (seen at
        # +1%). Without sharing, rank 0 publishes MASTER_ADDR/PORT every round.
        env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if self.backend == "torch" else None
        first = 0
        for i, count in enumerate(_split(n, k_clients)):
            cfg = dict(base, first_index=first, count=count)
            first += count + k  # room for the +1% participants of this client
            argv = [python, str(CLIENT), json.dumps(cfg)]
            self.clients.append(Proc(argv, self.tmp / f"client{i}.log", env=env))
        for c in self.clients:
            c.answer(120 + n / 20)
        log(f"{self.backend} N={n}: store pid {store.pid}, {k_clients} clients ready")

        # (1) the round, from a common start
        before = store.stats()
        clients_cpu = self._clients_cpu()
        busy, wall = _busy(), time.monotonic()
        t0 = time.time() + 1.0 + n / 2000  # every thread started by then
        profiling: tuple[threading.Thread, Path] | None = None
        if isinstance(store, EtcdStore) and args.profile:
            path = Path(f"{args.profile}.{n}")
            seconds = t0 - time.time() + args.profile_seconds
            profiling = (store.start_profile(seconds, path), path)
        self._all(f"go {t0!r}", 60)
        times = self._wait(t0, n, "the first round", first=True)
        after = store.stats()
        row.clients_round_cpu_s = self._clients_cpu() - clients_cpu
        others = _busy() - busy - row.clients_round_cpu_s - (after.cpu_s - before.cpu_s)
        cores = os.cpu_count() or 1
        row.others_round_cpu_pct = max(0.0, 100 * others / ((time.monotonic() - wall) * cores))
        row.round_by_op = _ops(before, after)
        row.round_p50 = statistics.median(times)
        row.round_p99 = _percentile(times, 0.99)
        row.round_max = max(times)
        row.round_requests = _delta(after.requests, before.requests)
        row.round_bytes = after.bytes_in + after.bytes_out - before.bytes_in - before.bytes_out
        log(f"{self.backend} N={n}: round complete in {row.round_max:.2f} s")

        # (2) steady state
        time.sleep(interval + 1.0)
        s0 = store.stats()
        time.sleep(args.periods * interval)
        s1 = store.stats()
        req = _delta(s1.requests, s0.requests)
        row.period_requests = None if req is None else req / args.periods
        row.period_bytes = (s1.bytes_in + s1.bytes_out - s0.bytes_in - s0.bytes_out) / args.periods
        row.period_by_op = {op: c // args.periods for op, c in _ops(s0, s1).items()}

        # (3) +1%: min = max = N + k, then k newcomers; (4) -1%: min = max = N, then k of
        # the N + k die. A phase that does not complete is noted; the size goes on.
        try:
            self._all(f"settings {n + k} {n + k}", 60)
            t1 = time.time() + 0.2
            s0 = store.stats()
            self._each([f"add {c} {t1!r} {n + k} {n + k}" for c in _split(k, k_clients)], 120)
            row.reform_plus = max(self._wait(t1, n + k, "the round after adding 1%"))
            s1 = store.stats()
            row.plus_requests, row.plus_bytes = _delta(s1.requests, s0.requests), _bytes(s0, s1)
            row.plus_by_op = _ops(s0, s1)
            log(f"{self.backend} N={n}: +{k} re-formed in {row.reform_plus:.2f} s")
            self._all(f"settings {n} {n}", 60)
            t2 = time.time()
            s0 = store.stats()
            self._each([f"kill {c} {t2!r}" for c in _split(k, k_clients)], 120)
            row.reform_minus = max(self._wait(t2, n, "the round after killing 1%"))
            s1 = store.stats()
            row.minus_requests, row.minus_bytes = _delta(s1.requests, s0.requests), _bytes(s0, s1)
            row.minus_by_op = _ops(s0, s1)
            log(f"{self.backend} N={n}: -{k} re-formed in {row.reform_minus:.2f} s")
        except TimeoutError as exc:
            row.note = str(exc)
            # what the phase that did not complete cost, up to now
            if row.reform_plus is None:
                row.plus_by_op = _ops(s0, store.stats())
            elif row.reform_minus is None:
                row.minus_by_op = _ops(s0, store.stats())

        end = store.stats()
        row.store_cpu_s = end.cpu_s  # a fresh store per size: its whole life
        row.store_rss_mib = end.rss / 2**20
        row.listen_overflows = listen_overflows() - overflows
        row.wall_s = time.monotonic() - started
        if isinstance(store, TcpStore) and args.profile:
            store.profile()
        if profiling is not None:
            thread, path = profiling
            thread.join()
            if path.exists():
                log(f"etcd N={n}, from the round's start ({path}):")
                log(pprof_top.report(pprof_top.Profile(path)))
        return row

    def _clients_cpu(self) -> float:
        total = 0.0
        for c in self.clients:
            with contextlib.suppress(psutil.Error):
                cpu = psutil.Process(c.pid).cpu_times()
                total += cpu.user + cpu.system
        return total

    def close(self) -> None:
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.send("quit")
        for c in self.clients:
            c.kill()
        if self.store is not None:
            if self.row.store_cpu_s is None:
                cpu, rss = self.store.usage()
                self.row.store_cpu_s = cpu if not math.isnan(cpu) else None
                self.row.store_rss_mib = rss / 2**20 if rss else None
            self.store.stop()


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _busy() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait)."""
    t = psutil.cpu_times()
    return float(sum(t)) - t.idle - getattr(t, "iowait", 0.0)


def _bytes(before: StoreStats, after: StoreStats) -> int:
    return after.bytes_in + after.bytes_out - before.bytes_in - before.bytes_out


def _ops(before: StoreStats, after: StoreStats) -> dict[str, int]:
    """Requests by operation between two snapshots (tcp); the loop's lag is the worst
    between them, as read at ``after``."""
    return {
        op: count if op.startswith("loop lag") else count - before.by_op.get(op, 0)
        for op, count in sorted(after.by_op.items())
        if op.startswith("loop lag") or count > before.by_op.get(op, 0)
    }


def run_backend(backend: str, args: argparse.Namespace, root: Path, rows: list[Row]) -> None:
    """Run ``backend`` at each size, appending to ``rows`` as each size ends."""
    stop_reason = ""
    for n in args.sizes:
        if stop_reason:
            rows.append(Row(backend, n, status="skipped", note=stop_reason))
            continue
        tmp = Path(tempfile.mkdtemp(prefix=f"{backend}-{n}-", dir=root))
        size = Size(backend, n, args, tmp)
        started = time.monotonic()
        log(f"{backend} N={n}: starting (load average {os.getloadavg()[0]:.2f})")
        try:
            row = size.run()
        except TimeoutError as exc:
            row = size.row
            row.status, row.note = "over budget", str(exc)
        except RunError as exc:
            row = size.row
            row.status, row.note = "failed", str(exc)[:600]
        finally:
            size.close()
            found = sweep(str(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
            if found:
                log(f"swept {found} leftover process(es) of {backend} N={n}")
        row.wall_s = time.monotonic() - started
        rows.append(row)
        log(f"{backend} N={n}: {row.status} {json.dumps(asdict(row))}")
        if row.status in ("failed", "over budget"):
            stop_reason = f"{row.status} at N={n}"
        elif row.wall_s > args.budget:
            stop_reason = f"N={n} took {row.wall_s:.0f} s > budget {args.budget:g} s"


# -- report -----------------------------------------------------------------------------


def slope(rows: list[Row], attr: str) -> float | None:
    """Least-squares slope of log(value) against log(N) over the rows that have it."""
    points = [(math.log(r.n), math.log(v)) for r in rows if (v := getattr(r, attr)) and v > 0]
    if len(points) < 3:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def _f(value: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, fmt)


def table(backend: str, rows: list[Row]) -> list[str]:
    apis = sorted({r.api for r in rows if r.api})
    out = [
        f"== {backend}{' over ' + ', '.join(apis) if apis else ''} ==",
        f"{'N':>5} {'K':>2} {'load':>5} {'p50 s':>7} {'p99 s':>7} {'max s':>7} "
        f"{'req/round':>10} {'MiB/round':>10} {'req/period':>10} {'KiB/period':>10} "
        f"{'+1% s':>7} {'-1% s':>7} {'cpu s':>7} {'RSS MiB':>8} {'cli cpu':>7} {'oth%':>5} "
        f"{'ovfl':>5}  status",
    ]
    for r in rows:
        if r.status == "skipped" and r.round_max is None:
            out.append(f"{r.n:>5}  skipped: {r.note}")
            continue
        out.append(
            f"{r.n:>5} {r.clients:>2} {r.load1:>5.2f} {_f(r.round_p50, '7.2f')} "
            f"{_f(r.round_p99, '7.2f')} {_f(r.round_max, '7.2f')} "
            f"{_f(r.round_requests, '10.0f')} {_f(r.round_bytes, '10.2f', 2**20)} "
            f"{_f(r.period_requests, '10.0f')} {_f(r.period_bytes, '10.1f', 2**10)} "
            f"{_f(r.reform_plus, '7.2f')} {_f(r.reform_minus, '7.2f')} "
            f"{_f(r.store_cpu_s, '7.1f')} {_f(r.store_rss_mib, '8.1f')} "
            f"{_f(r.clients_round_cpu_s, '7.1f')} {_f(r.others_round_cpu_pct, '5.0f')} "
            f"{r.listen_overflows:>5}  "
            f"{r.status}{': ' + r.note if r.note else ''}"
        )
    for r in rows:
        for what, ops, size in (
            ("round", r.round_by_op, r.round_bytes),
            ("period", r.period_by_op, r.period_bytes),
            ("+1%", r.plus_by_op, r.plus_bytes),
            ("-1%", r.minus_by_op, r.minus_bytes),
        ):
            if ops:
                lag = ops.get("loop lag ms (max)")
                counts = {op: c for op, c in ops.items() if not op.startswith("loop lag")}
                top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
                listed = ", ".join(f"{op} {count}" for op, count in top)
                out.append(
                    f"  N={r.n} {what}: {_f(size, '.2f', 2**20)} MiB; requests {listed}"
                    + ("" if lag is None else f"; store loop lag up to {lag} ms")
                )
    for attr, what in (("round_bytes", "bytes/round"), ("period_bytes", "bytes/period"),
                       ("round_max", "round time")):  # fmt: skip
        s = slope(rows, attr)
        out.append(f"  log-log slope of {what} vs N: {_f(s, '.2f')}")
    return out


@dataclass
class Target:
    name: str
    verdict: str  # PASS, FAIL, n/a
    detail: str


def targets(results: dict[str, list[Row]]) -> list[Target]:
    tcp = {r.n: r for r in results.get("tcp", [])}
    found: list[Target] = []
    for n, limit in ((1024, 5.0), (4096, 30.0)):
        r = tcp.get(n)
        name = f"tcp round at N={n} <= {limit:g} s"
        if r is None or (r.status == "skipped" and r.round_max is None):
            found.append(Target(name, "n/a" if r is None else "FAIL", "not run" if r is None
                                else f"not run: {r.note}"))  # fmt: skip
        elif r.round_max is None:
            found.append(Target(name, "FAIL", f"{r.status}: {r.note}"))
        else:
            ok = r.round_max <= limit
            detail = f"{r.round_max:.2f} s ({r.round_max / limit:.1f}x the target)"
            found.append(Target(name, "PASS" if ok else "FAIL", detail))
    rows = results.get("tcp", [])
    for attr, what in (("round_bytes", "bytes per round"), ("period_bytes", "bytes per period")):
        s = slope(rows, attr)
        name = f"tcp {what}: log-log slope <= 1.2"
        if s is None:
            found.append(Target(name, "n/a", "fewer than 3 sizes"))
        else:
            ns = [r.n for r in rows if getattr(r, attr)]
            found.append(Target(name, "PASS" if s <= 1.2 else "FAIL",
                                f"slope {s:.2f} over N={min(ns)}..{max(ns)}"))  # fmt: skip
    if "etcd" in results and "tcp" in results:
        worst: list[str] = []
        compared = 0
        for r in results["etcd"]:
            t = tcp.get(r.n)
            if r.n > 1024 or t is None or t.round_max is None:
                continue
            compared += 1
            if r.round_max is None:
                worst.append(f"N={r.n}: etcd {r.status}")
            elif r.round_max > 2 * t.round_max:
                worst.append(f"N={r.n}: {r.round_max / t.round_max:.1f}x")
        name = "etcd round within 2x of tcp up to N=1,024"
        if not compared:
            found.append(Target(name, "n/a", "no size both ran"))
        else:
            ratios = [
                f"{r.n}: {r.round_max / tcp[r.n].round_max:.1f}x"  # type: ignore[operator]
                for r in results["etcd"]
                if r.n <= 1024 and r.round_max and tcp.get(r.n) and tcp[r.n].round_max
            ]
            found.append(Target(name, "FAIL" if worst else "PASS",
                                "; ".join(worst) if worst else ", ".join(ratios)))  # fmt: skip
    return found


# -- main -------------------------------------------------------------------------------


def _sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 2:
        raise argparse.ArgumentTypeError("sizes: comma-separated integers >= 2")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        help="N values, comma-separated (default 64,128,...,8192)",
    )
    parser.add_argument(
        "--backends", default="tcp", help="comma-separated, of tcp,etcd,redis,torch (default tcp)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="s per size; larger N of a backend are skipped past it",
    )
    parser.add_argument(
        "--phase-budget",
        type=float,
        default=0.0,
        help="s each re-form (+1%%, -1%%) may take (0: --budget); past it, noted",
    )
    parser.add_argument("--clients", type=int, default=0, help="client processes (0: auto)")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--periods", type=int, default=3, help="heartbeat periods measured")
    parser.add_argument("--torch-python", default=str(DEFAULT_TORCH_PYTHON))
    parser.add_argument(
        "--torch-monitor-interval",
        type=float,
        default=0.1,
        help="torch agents poll num_nodes_waiting this often (torchrun: 0.1)",
    )
    parser.add_argument(
        "--profile",
        help="tcp: append the store thread's cProfile here; etcd: save its CPU profile "
        "from the round's start to PROFILE.<N> and print where the time went",
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=20.0, help="etcd: how long it profiles"
    )
    parser.add_argument(
        "--etcd-api",
        choices=("http", "grpc"),
        default="http",
        help="etcd: how participants reach it (http: its JSON gateway; grpc needs grpcio)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="N=32,64 on tcp, heartbeat 0.5 s, ~20 s"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not tables")
    parser.add_argument("--save", help="also write the JSON to this file")
    parser.add_argument(
        "--merge",
        action="append",
        default=[],
        help="a --save file of an earlier run: its backends join the tables and targets",
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.backends, args.periods, args.budget = [32, 64], "tcp", 1, 60.0
        args.heartbeat_interval = 0.5
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}")

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:  # root may raise the hard limit itself (8,192 participants need ~25,000 files)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 65536), max(hard, 65536)))
    except (OSError, ValueError):
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(OSError):
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        if somaxconn < 4096:
            log(f"net.core.somaxconn is {somaxconn}: connection bursts may overflow it")
    log(f"open-file limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}, "
        f"load average {os.getloadavg()}, {os.cpu_count()} cores")  # fmt: skip

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    results: dict[str, list[Row]] = {}
    notes: list[str] = []
    interrupted = False
    try:
        for backend in backends:
            if backend == "torch":
                version = torch_version(args.torch_python) if args.torch_python else None
                if version is None:
                    notes.append(f"torch: skipped, torch does not import in {args.torch_python!r}")
                    continue
                notes.append(f"torch: {version} in {args.torch_python}")
            results[backend] = []
            run_backend(backend, args, root, results[backend])
    except KeyboardInterrupt:
        log("interrupted: cleaning up; the sizes done so far follow")
        interrupted = True
    finally:
        found = sweep(str(root))
        shutil.rmtree(root, ignore_errors=True)
        if found:
            log(f"swept {found} leftover process(es)")
    for earlier in args.merge:
        document = json.loads(Path(earlier).read_text())
        for backend, rows in document["results"].items():
            if backend not in results:
                results[backend] = [Row(**r) for r in rows]
                notes.append(f"{backend}: from {earlier}")
        notes.extend(n for n in document.get("notes", []) if n not in notes)
    results = {b: results[b] for b in BACKENDS if b in results}
    verdicts = targets(results)
    failed = [r for rows in results.values() for r in rows if r.status == "failed"]
    missed = [t for t in verdicts if t.verdict == "FAIL"]
    text = json.dumps({
        "settings": dict(vars(args)),
        "load_average_end": os.getloadavg(),
        "results": {b: [asdict(r) for r in rows] for b, rows in results.items()},
        "targets": [asdict(t) for t in verdicts],
        "notes": notes,
    }, indent=1)  # fmt: skip
    if args.save:
        Path(args.save).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        print(
            f"rendezvous scale: heartbeat {args.heartbeat_interval:g} s (timeout "
            f"{3 * args.heartbeat_interval:g} s), {args.periods} periods, budget "
            f"{args.budget:g} s/size, {os.cpu_count()} cores; load average at the end "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        print(
            "columns: K client processes, load = 1-min load average at the start; round "
            "p50/p99/max from a common start; MiB/round and KiB/period = store bytes in+out; "
            "+1%/-1% = re-form after adding/killing k = N/100; cpu s = store process CPU over "
            "the size; cli cpu = client processes' CPU while the first round formed; oth% = "
            "CPU of everything else on the machine then (% of all cores); ovfl = listen "
            "overflows"
        )
        for note in notes:
            print(note)
        for backend, rows in results.items():
            print("\n".join(table(backend, rows)))
        print("targets:")
        for t in verdicts:
            print(f"  {t.verdict:<4} {t.name}: {t.detail}")
    if interrupted:
        return 130
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main())
