"""The built-in TCP store under a connection flood: the hosting agent's RSS and CPU.

A benchmark, not a test. Each scenario starts one ``elastic-run`` agent (``rdzv=tcp``,
``nnodes=1``, a token, one worker that sleeps: ``bench/_worker.py``), so the agent hosts
the store on ``127.0.0.1:<fresh port>`` as in a real job, waits until its worker runs,
then attacks the store from this process, on loopback only:

* ``idle``: ``--idle`` connections (1000) that send nothing, held ``--hold`` s;
* ``idle-lowfd``: the same with ``--idle-lowfd`` connections (1100) against an agent
  whose open-file limit is ``--lowfd`` (1024: ``ulimit -n 1024``), the case that crashed
  the agent before the store had connection caps;
* ``flood``: ``--flood`` connections (100), each sending a ``--frame-mib`` (16) MiB frame
  header and all but the last byte of its body before any ``hello``, held ``--hold`` s.

For each it prints the agent's RSS (MiB) and CPU (% of one core, user+sys of the agent
process, whose store thread does the serving) before the attack (over 2 s), during it
(peak RSS, CPU over the hold) and 2 s after the attacker closed everything; the latency
of a well-formed request (connect, ``hello`` with the token, ``get``) made during the
attack (median and max of one every 0.1 s; "-" when none was answered within 5 s);
whether the agent and its worker were still running at the end; and how many lines the
agent wrote to its stderr during the scenario. Reproduce from the repository root (about
30 s)::

    .venv/bin/python bench/store_flood.py
    .venv/bin/python bench/store_flood.py --json      # machine-readable

Every agent runs in its own session and is SIGKILLed with its session at the end;
leftover processes are swept by the temp dir in their command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _procs import sweep  # bench/ is on the path: scripts run from it

from elastic_runner.testing.runner import free_port

BENCH_DIR = Path(__file__).resolve().parent
WORKER = BENCH_DIR / "_worker.py"
TOKEN = "bench-token"


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body


def recv_frame(sock: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    (size,) = struct.unpack(">I", exactly(4))
    answer: dict[str, Any] = json.loads(exactly(size))
    return answer


def probe(port: int) -> float | None:
    """Seconds a well-formed request takes (connect, hello, get), None if unanswered."""
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(frame({"id": 1, "op": "hello", "token": TOKEN}))
            if not recv_frame(s).get("ok"):
                return None
            s.sendall(frame({"id": 2, "op": "get", "args": {"key": "bench"}}))
            if not recv_frame(s).get("ok"):
                return None
    except (OSError, ValueError):
        return None
    return time.monotonic() - t0


@dataclass
class Figures:
    scenario: str
    connections: int
    nofile: int | None
    rss_before: float = 0.0
    cpu_before: float = 0.0
    rss_peak: float = 0.0
    cpu_during: float = 0.0
    rss_after: float = 0.0
    cpu_after: float = 0.0
    probe_median_ms: float | None = None
    probe_max_ms: float | None = None
    probes_unanswered: int = 0
    agent_alive: bool = True
    worker_alive: bool = True
    stderr_lines: int = 0
    fds_peak: int = 0
    notes: list[str] = field(default_factory=list)


class Agent:
    """One elastic-run agent hosting the store, in its own session."""

    def __init__(self, tmp: Path, nofile: int | None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.out = tmp / "out"
        self.out.mkdir()
        self.stderr = tmp / "agent.err"
        argv = [
            str(Path(sys.executable).with_name("elastic-run")),
            f"job.entrypoint={sys.executable}",
            f"job.args=[{WORKER},{self.out},sleep]",
            "rdzv=tcp",
            f"rdzv.endpoint=127.0.0.1:{self.port}",
            f"rdzv.token={TOKEN}",
            f"rdzv.id=bench-{uuid.uuid4().hex[:8]}",
            "nnodes=1",
            f"hydra.run.dir={tmp / 'run'}",
        ]

        def limit() -> None:
            if nofile:
                _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                preexec_fn=limit,
            )
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        while not list(self.out.glob("a0_r0.start")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not start: {self.stderr.read_text()[-2000:]}")
            time.sleep(0.05)

    def lines(self) -> int:
        return len(self.stderr.read_text(errors="replace").splitlines())

    def worker_alive(self) -> bool:
        with contextlib.suppress(psutil.Error):
            return any(
                "_worker.py" in " ".join(c.cmdline()) for c in self.ps.children(recursive=True)
            )
        return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class Sampler:
    """Peak RSS and CPU time of one process while running."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.peak = 0
        self.fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.proc.memory_info().rss)
                self.fds = max(self.fds, self.proc.num_fds())
            self._stop.wait(0.02)

    @contextlib.contextmanager
    def measure(self) -> Iterator[Callable[[], float]]:
        """Yields a function giving the CPU % (of one core) since entering."""
        t0, c0 = time.monotonic(), self._cpu()
        self._thread.start()
        try:
            yield lambda: 100 * (self._cpu() - c0) / max(1e-9, time.monotonic() - t0)
        finally:
            self._stop.set()
            self._thread.join()

    def _cpu(self) -> float:
        try:
            times = self.proc.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)


def quiet(proc: psutil.Process, seconds: float) -> tuple[float, float]:
    """(RSS MiB at the end, CPU %) over ``seconds`` of no attack."""
    try:
        c0 = sum(proc.cpu_times()[:2])
        time.sleep(seconds)
        c1 = sum(proc.cpu_times()[:2])
        return proc.memory_info().rss / 2**20, 100 * (c1 - c0) / seconds
    except psutil.Error:
        return 0.0, 0.0


def open_idle(port: int, n: int, within: float = 10.0) -> tuple[list[socket.socket], int]:
    """``n`` connections that send nothing, and how many of them the kernel established
    within ``within`` s (a full accept queue drops SYNs; the kernel retries them)."""
    socks = []
    for i in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))  # no wait: a full backlog must not stall us
        socks.append(s)
        if i % 50 == 49:
            time.sleep(0.02)  # paced: an overflowing accept queue only delays the rest
    import selectors

    pending = set(socks)
    established = 0
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_WRITE)
        deadline = time.monotonic() + within
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj  # type: ignore[assignment]
                sel.unregister(s)
                pending.discard(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    established += 1
    return socks, established


def open_flood(port: int, n: int, mib: int, hold: float) -> tuple[list[socket.socket], list[str]]:
    size = mib << 20
    body = b"x" * (size - 1)  # all but the last byte: the server must keep waiting
    socks: list[socket.socket] = []
    outcomes: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        s = socket.socket()
        s.settimeout(hold + 10)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(struct.pack(">I", size))
            s.sendall(body)
            outcome = "sent"
        except TimeoutError:
            outcome = "send timed out"
        except OSError as exc:
            outcome = f"refused ({type(exc).__name__})"
        with lock:
            socks.append(s)
            outcomes.append(outcome)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(hold + 15)
    return socks, outcomes


def scenario(name: str, n: int, nofile: int | None, args: argparse.Namespace) -> Figures:
    figures = Figures(name, n, nofile)
    tmp = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    agent = None
    try:
        agent = Agent(tmp, nofile)
        figures.rss_before, figures.cpu_before = quiet(agent.ps, 2.0)
        lines0 = agent.lines()
        sampler = Sampler(agent.ps)
        latencies: list[float | None] = []
        with sampler.measure() as cpu:
            stop = threading.Event()

            def probing() -> None:
                while not stop.is_set():
                    latencies.append(probe(agent.port))
                    stop.wait(0.1)

            prober = threading.Thread(target=probing, daemon=True)
            if name == "flood":
                socks, outcomes = open_flood(agent.port, n, args.frame_mib, args.hold)
                figures.notes = sorted({f"{outcomes.count(o)} {o}" for o in outcomes})
                prober.start()
                time.sleep(args.hold)
            else:
                socks, established = open_idle(agent.port, n)
                figures.notes = [f"{established} of {n} established"]
                prober.start()
                time.sleep(args.hold)
            stop.set()
            prober.join(10)
            figures.cpu_during = cpu()
        figures.rss_peak = sampler.peak / 2**20
        figures.fds_peak = sampler.fds
        for s in socks:
            s.close()
        figures.rss_after, figures.cpu_after = quiet(agent.ps, 2.0)
        answered = [x for x in latencies if x is not None]
        figures.probes_unanswered = len(latencies) - len(answered)
        if answered:
            figures.probe_median_ms = 1000 * statistics.median(answered)
            figures.probe_max_ms = 1000 * max(answered)
        figures.agent_alive = agent.proc.poll() is None
        figures.worker_alive = figures.agent_alive and agent.worker_alive()
        figures.stderr_lines = agent.lines() - lines0
        logged = agent.stderr.read_text(errors="replace").splitlines()[lines0:]
        figures.notes += [f"log: {line[:150]}" for line in logged[:3]]
        if not figures.agent_alive:
            tail = agent.stderr.read_text(errors="replace").strip().splitlines()[-1:]
            figures.notes.append(f"agent exited {agent.proc.returncode}: {tail}")
    finally:
        if agent is not None:
            agent.kill()
        sweep(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


def show(results: list[Figures]) -> None:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    print(
        f"{'scenario':<11} {'conns':>5} {'nofile':>6} | {'RSS MiB before/peak/after':>26} | "
        f"{'CPU % before/during/after':>26} | {'probe ms med/max':>16} {'unans':>5} | "
        f"{'fds':>5} {'agent':>5} {'worker':>6} {'lines':>5}"
    )
    for f in results:
        rss = f"{f.rss_before:.0f} / {f.rss_peak:.0f} / {f.rss_after:.0f}"
        cpu = f"{f.cpu_before:.1f} / {f.cpu_during:.1f} / {f.cpu_after:.1f}"
        probe_ms = f"{ms(f.probe_median_ms)} / {ms(f.probe_max_ms)}"
        print(
            f"{f.scenario:<11} {f.connections:>5} {f.nofile or '-':>6} | {rss:>26} | "
            f"{cpu:>26} | {probe_ms:>16} {f.probes_unanswered:>5} | {f.fds_peak:>5} "
            f"{'up' if f.agent_alive else 'DEAD':>5} {'up' if f.worker_alive else 'DEAD':>6} "
            f"{f.stderr_lines:>5}"
        )
        for note in f.notes:
            print(f"    {note}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--idle-lowfd", type=int, default=1100)
    parser.add_argument("--lowfd", type=int, default=1024)
    parser.add_argument("--flood", type=int, default=100)
    parser.add_argument("--frame-mib", type=int, default=16)
    parser.add_argument("--hold", type=float, default=3.0)
    parser.add_argument("--scenarios", default="idle,idle-lowfd,flood")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    wanted = args.scenarios.split(",")
    plan = [
        ("idle", args.idle, None),
        ("idle-lowfd", args.idle_lowfd, args.lowfd),
        ("flood", args.flood, None),
    ]
    results = []
    for name, n, nofile in plan:
        if name in wanted:
            print(f"-- {name}: {n} connections", file=sys.stderr, flush=True)
            results.append(scenario(name, n, nofile, args))
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        show(results)
    return 0 if all(r.agent_alive and r.worker_alive for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
