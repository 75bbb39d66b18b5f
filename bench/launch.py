"""Launch and restart latency of ``elastic-run``, side by side with ``torchrun --standalone``.

A benchmark, not a test: it prints medians (with min and max) over ``--runs`` runs of

(a)  wall time from starting the launcher process (just before ``subprocess.Popen``) to
     all N workers executing user code (the latest worker's first ``time.time()``),
     for N = 1 and N = 4;
(b)  time from a worker's SIGKILL (of itself) to the agent noticing. elastic-run: the
     ``detected_at`` of its ``torchelastic.worker.status.FAILED`` event in
     ``events.jsonl``; torchrun has no such timestamp, so its figure is the first
     "Sending process ... closing signal SIGTERM" line of its log (1 ms resolution);
(b') time from that SIGKILL to the first sibling worker receiving SIGTERM (its handler
     records ``time.time()``): the same observable for both tools (N = 4 only);
(c)  time from that SIGKILL to all workers of the next attempt executing user code.

Workers are ``bench/_worker.py`` (imports nothing before its first timestamp). For (b)
and (c), on the first attempt rank 0 waits until its siblings run, sleeps 0.3 s, records
the time and SIGKILLs itself; the group is restarted once (``max_restarts=1``) and every
worker of the second attempt records its start and exits 0. For elastic-run the script
also splits (a) and (c) using the agent's own events (agent ready = its RENDEZVOUS event,
spawned = its last START event).

``er-torchrun`` is the same run through elastic-run's torchrun front end:
``elastic-run torchrun --standalone --nproc-per-node N --max-restarts 1 _worker.py ...``.

torchrun is ``<torch-python> -m torch.distributed.run --standalone --nproc-per-node N
--max-restarts 1 _worker.py ...`` with its default monitor interval. It is compared when
torch imports in ``--torch-python`` (default: ``/tmp/torchvenv/bin/python`` if it
exists); otherwise only elastic-run is measured. Targets: (a) <= 0.3x torchrun,
(b) median < 5 ms, (c) <= 0.3x torchrun.

Runs of the two tools are interleaved, each preceded by ``--warmup`` untimed runs; every
run has its own temporary directory (removed afterwards), every launcher is waited for
(and its session killed on ``--timeout``), and leftover workers are swept by their
command line. Reproduce from the repository root::

    .venv/bin/python bench/launch.py --runs 7
    .venv/bin/python bench/launch.py --runs 7 --json   # machine-readable

With the defaults (7 runs, torch available) it takes about 75 s on 2 cores. Progress goes
to stderr; the exit status is 1 if a run failed or a target is missed, else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from _procs import sweep, torch_version  # bench/ is on the path: scripts run from it

BENCH_DIR = Path(__file__).resolve().parent
WORKER = BENCH_DIR / "_worker.py"
DEFAULT_TORCH_PYTHON = Path("/tmp/torchvenv/bin/python")

ELASTIC = "elastic-run"
#: ``elastic-run torchrun <torchrun's own line>``: the same run through the torchrun front end
ELASTIC_TORCHRUN = "er-torchrun"
TORCHRUN = "torchrun"

#: Reference figures measured earlier for torchrun 2.13 on CPU (ms), shown for context.
TORCHRUN_REFERENCE = {"a": "~1600 (N=1)", "b": "~50", "c": "~200-350"}


class RunError(RuntimeError):
    """One run did not go as the scenario expects (its log tail is in the message)."""


# -- running one launcher ---------------------------------------------------------------


@dataclass
class Launch:
    """One launcher run: its start time, exit code and the files it left."""

    t0: float
    returncode: int
    wall_s: float
    out: Path
    run_dir: Path
    log: Path

    def times(self, pattern: str) -> list[float]:
        return [float(p.read_text()) for p in sorted(self.out.glob(pattern))]

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


def run_launcher(
    argv: Sequence[str], tmp: Path, out: Path, run_dir: Path, timeout: float
) -> Launch:
    """Start ``argv`` in its own session (cwd ``tmp``, output to ``tmp/launcher.log``),
    wait for it, kill its session on timeout, then sweep leftover workers."""
    log = tmp / "launcher.log"
    with open(log, "wb") as log_file:
        t0 = time.time()
        proc = subprocess.Popen(
            list(argv),
            cwd=tmp,
            # torchrun makes its log directory under TMPDIR: in tmp, removed with it
            env={**os.environ, "TMPDIR": str(tmp)},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            left = sweep(str(tmp))
            launch = Launch(t0, -1, time.time() - t0, out, run_dir, log)
            raise RunError(
                f"timed out after {timeout:g} s ({left} worker(s) killed): "
                f"{' '.join(argv)}\n{launch.log_tail()}"
            ) from None
        wall = time.time() - t0
    left = sweep(str(tmp))
    launch = Launch(t0, returncode, wall, out, run_dir, log)
    if left:
        raise RunError(f"{left} worker process(es) outlived the launcher: {' '.join(argv)}")
    if returncode != 0:
        raise RunError(f"exit code {returncode}: {' '.join(argv)}\n{launch.log_tail()}")
    return launch


@dataclass
class Tool:
    name: str
    argv: Callable[[Path, Path, str, int], list[str]]
    description: str


def elastic_tool(elastic_run: str) -> Tool:
    def argv(out: Path, run_dir: Path, mode: str, n: int) -> list[str]:
        return [
            elastic_run,
            f"job.entrypoint={WORKER}",
            f"job.args=['{out}',{mode}]",
            f"job.nproc_per_node={n}",
            "max_restarts=1",
            f"hydra.run.dir={run_dir}",
        ]

    return Tool(ELASTIC, argv, elastic_run)


def elastic_torchrun_tool(elastic_run: str) -> Tool:
    def argv(out: Path, run_dir: Path, mode: str, n: int) -> list[str]:
        return [
            elastic_run, f"hydra.run.dir={run_dir}", "torchrun", "--standalone",
            "--nproc-per-node", str(n), "--max-restarts", "1",
            str(WORKER), str(out), mode,
        ]  # fmt: skip

    return Tool(ELASTIC_TORCHRUN, argv, f"{elastic_run} torchrun (torchrun's command line)")


def torchrun_tool(python: str, version: str) -> Tool:
    def argv(out: Path, run_dir: Path, mode: str, n: int) -> list[str]:
        return [
            python, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(n), "--max-restarts", "1",
            str(WORKER), str(out), mode,
        ]  # fmt: skip

    return Tool(TORCHRUN, argv, f"{python} -m torch.distributed.run (torch {version})")


def launch_once(tool: Tool, mode: str, n: int, timeout: float, keep: bool) -> dict[str, float]:
    """One run of ``tool`` in ``mode`` with ``n`` workers; returns metrics in ms."""
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-launch-{tool.name}-"))
    try:
        out, run_dir = tmp / "out", tmp / "run"
        out.mkdir()
        launch = run_launcher(tool.argv(out, run_dir, mode, n), tmp, out, run_dir, timeout)
        if mode == "start":
            return _start_metrics(tool, launch, n)
        return _kill_metrics(tool, launch, n)
    finally:
        if keep:
            print(f"  kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- metrics of one run -----------------------------------------------------------------


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _expect(launch: Launch, pattern: str, n: int) -> list[float]:
    times = launch.times(pattern)
    if len(times) != n:
        raise RunError(f"expected {n} files {pattern}, found {len(times)}\n{launch.log_tail()}")
    return times


def _events(launch: Launch) -> list[dict[str, Any]]:
    path = launch.run_dir / "events.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _attempt_events(events: list[dict[str, Any]], name: str, attempt: int) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e["name"] == f"torchelastic.worker.status.{name}"
        and e["metadata"].get("attempt") == attempt
    ]


def _start_metrics(tool: Tool, launch: Launch, n: int) -> dict[str, float]:
    started = max(_expect(launch, "a0_r*.start", n))
    metrics = {"a": _ms(started - launch.t0)}
    if tool.name in (ELASTIC, ELASTIC_TORCHRUN):
        events = _events(launch)
        ready = _attempt_events(events, "RENDEZVOUS", 1)[0]["timestamp"]
        spawned = max(e["timestamp"] for e in _attempt_events(events, "START", 1))
        metrics["a.agent_ready"] = _ms(ready - launch.t0)
        metrics["a.spawned"] = _ms(spawned - launch.t0)
    return metrics


_SIGTERM_LOG = "closing signal SIGTERM"


def _torchrun_noticed(launch: Launch) -> float | None:
    """Time of torchrun's first "Sending process ... closing signal SIGTERM" log line,
    e.g. ``W1121 23:59:40.231000 5029 torch/...] Sending process 5039 closing signal
    SIGTERM`` (glog format, local time, millisecond resolution)."""
    for line in launch.log.read_text(errors="replace").splitlines():
        if _SIGTERM_LOG not in line or len(line) < 21:
            continue
        try:
            year = datetime.fromtimestamp(launch.t0).year
            stamp = datetime.strptime(f"{year}{line[1:21]}", "%Y%m%d %H:%M:%S.%f")
        except ValueError:
            return None
        return stamp.timestamp()
    return None


def _kill_metrics(tool: Tool, launch: Launch, n: int) -> dict[str, float]:
    killed = _expect(launch, "kill", 1)[0]
    restarted = max(_expect(launch, "a1_r*.start", n))
    metrics = {"c": _ms(restarted - killed)}
    if n > 1:
        metrics["b_term"] = _ms(min(_expect(launch, "a0_r*.term", n - 1)) - killed)
    if tool.name in (ELASTIC, ELASTIC_TORCHRUN):
        events = _events(launch)
        failed = [e for e in _attempt_events(events, "FAILED", 1) if e["source"] == "WORKER"]
        if len(failed) != 1:
            raise RunError(f"expected one FAILED worker event, got {len(failed)}")
        metrics["b"] = _ms(failed[0]["metadata"]["detected_at"] - killed)
        ready = _attempt_events(events, "RENDEZVOUS", 2)[0]["timestamp"]
        spawned = max(e["timestamp"] for e in _attempt_events(events, "START", 2))
        metrics["c.agent_ready"] = _ms(ready - killed)
        metrics["c.spawned"] = _ms(spawned - killed)
    else:
        noticed = _torchrun_noticed(launch)
        if noticed is not None:
            metrics["b"] = _ms(noticed - killed)
    return metrics


# -- the benchmark ----------------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    mode: str
    n: int
    title: str


SCENARIOS = [
    Scenario("start_n1", "start", 1, "launch, N=1"),
    Scenario("start_n4", "start", 4, "launch, N=4"),
    Scenario("kill_n4", "kill", 4, "kill + restart, N=4"),
    Scenario("kill_n1", "kill", 1, "kill + restart, N=1"),
]

#: Rows of the table: (metric key, label); only metrics a scenario produced are shown.
ROWS = [
    ("a", "(a)  launcher start -> all workers run"),
    ("a.agent_ready", "     of which: agent ready (RENDEZVOUS)"),
    ("a.spawned", "     of which: all spawned (last START)"),
    ("b", "(b)  SIGKILL -> agent notices"),
    ("b_term", "(b') SIGKILL -> first sibling SIGTERM"),
    ("c", "(c)  SIGKILL -> next attempt all run"),
    ("c.agent_ready", "     of which: agent ready (RENDEZVOUS)"),
    ("c.spawned", "     of which: all spawned (last START)"),
]


@dataclass
class Results:
    #: samples[scenario][tool][metric] = list of ms
    samples: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, scenario: str, tool: str, metrics: dict[str, float]) -> None:
        per_tool = self.samples.setdefault(scenario, {}).setdefault(tool, {})
        for key, value in metrics.items():
            per_tool.setdefault(key, []).append(value)

    def values(self, scenario: str, tool: str, metric: str) -> list[float]:
        return self.samples.get(scenario, {}).get(tool, {}).get(metric, [])

    def median(self, scenario: str, tool: str, metric: str) -> float | None:
        values = self.values(scenario, tool, metric)
        return statistics.median(values) if values else None


def run_benchmark(tools: list[Tool], runs: int, warmup: int, timeout: float, keep: bool) -> Results:
    results = Results()
    for sc in SCENARIOS:
        for i in range(-warmup, runs):
            for tool in tools:
                label = "warm-up" if i < 0 else f"run {i + 1}/{runs}"
                print(f"{sc.title:<20} {tool.name:<12} {label}", file=sys.stderr, flush=True)
                try:
                    metrics = launch_once(tool, sc.mode, sc.n, timeout, keep)
                except (RunError, OSError, KeyError, IndexError, ValueError) as exc:
                    message = f"{sc.key} {tool.name} {label}: {type(exc).__name__}: {exc}"
                    print(f"  ERROR {message}", file=sys.stderr, flush=True)
                    results.errors.append(message)
                    continue
                if i >= 0:
                    results.add(sc.key, tool.name, metrics)
    return results


# -- reporting --------------------------------------------------------------------------


def _fmt(value: float | None, width: int = 8) -> str:
    return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"


def format_table(results: Results, tools: list[Tool]) -> list[str]:
    names = [t.name for t in tools]
    lines = [
        f"{'metric (ms)':<42}{'tool':<13}{'median':>8}{'min':>9}{'max':>9}{'n':>4}",
    ]
    for sc in SCENARIOS:
        lines.append(f"-- {sc.title} " + "-" * (81 - len(sc.title)))
        for key, label in ROWS:
            present = [name for name in names if results.values(sc.key, name, key)]
            if not present:
                continue
            for j, name in enumerate(present):
                values = results.values(sc.key, name, key)
                lines.append(
                    f"{label if j == 0 else '':<42}{name:<13}"
                    f"{_fmt(statistics.median(values))} {_fmt(min(values))} "
                    f"{_fmt(max(values))}{len(values):>4}"
                )
            el = results.median(sc.key, ELASTIC, key)
            tr = results.median(sc.key, TORCHRUN, key)
            if el is not None and tr:
                lines.append(f"{'':<42}{'ratio e/t':<13}{el / tr:>7.2f}x")
    return lines


@dataclass
class Verdict:
    metric: str
    text: str
    status: str  # PASS, FAIL or SKIP


def verdicts(results: Results, have_torch: bool) -> list[Verdict]:
    out: list[Verdict] = []
    for metric, scenarios in (("a", ("start_n1", "start_n4")), ("c", ("kill_n4", "kill_n1"))):
        for key in scenarios:
            n = key[-1]
            el = results.median(key, ELASTIC, metric)
            tr = results.median(key, TORCHRUN, metric)
            name = f"({metric}) N={n}"
            if el is None:
                out.append(Verdict(name, "no elastic-run figure", "FAIL"))
            elif not have_torch or not tr:
                out.append(Verdict(
                    name, f"elastic-run {el:.1f} ms; target <= 0.3x torchrun (no torchrun)",
                    "SKIP",
                ))  # fmt: skip
            else:
                ratio = el / tr
                out.append(Verdict(
                    name,
                    f"elastic-run {el:.1f} ms / torchrun {tr:.1f} ms = {ratio:.2f}x "
                    f"(target <= 0.3x)",
                    "PASS" if ratio <= 0.3 else "FAIL",
                ))  # fmt: skip
    for key in ("kill_n4", "kill_n1"):
        n = key[-1]
        el = results.median(key, ELASTIC, "b")
        if el is None:
            out.append(Verdict(f"(b) N={n}", "no elastic-run figure", "FAIL"))
            continue
        tr = results.median(key, TORCHRUN, "b")
        extra = f"; torchrun {tr:.1f} ms" if tr is not None else ""
        out.append(Verdict(
            f"(b) N={n}", f"elastic-run median {el:.2f} ms (target < 5 ms){extra}",
            "PASS" if el < 5.0 else "FAIL",
        ))  # fmt: skip
    order = {"(a)": 0, "(b)": 1, "(c)": 2}
    return sorted(out, key=lambda v: order[v.metric[:3]])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Launch/restart latency of elastic-run vs torchrun --standalone.",
    )
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure (7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (1)")
    parser.add_argument(
        "--elastic-run", default=str(Path(sys.executable).parent / "elastic-run"),
        help="the elastic-run executable (default: next to this python)",
    )  # fmt: skip
    parser.add_argument(
        "--torch-python", default=None,
        help=f"a python where torch imports ('' to skip; default: {DEFAULT_TORCH_PYTHON} "
        "if it exists)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=60.0, help="per run, s (60)")
    parser.add_argument("--keep", action="store_true", help="keep each run's temp dir")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tools = [elastic_tool(args.elastic_run), elastic_torchrun_tool(args.elastic_run)]
    notes: list[str] = []
    torch_python = args.torch_python
    if torch_python is None and DEFAULT_TORCH_PYTHON.exists():
        torch_python = str(DEFAULT_TORCH_PYTHON)
    if torch_python:
        version = torch_version(torch_python)
        if version is None:
            notes.append(f"torch does not import in {torch_python}: torchrun skipped")
        else:
            tools.append(torchrun_tool(torch_python, version))
    else:
        notes.append("no --torch-python: torchrun skipped")
    have_torch = any(t.name == TORCHRUN for t in tools)

    started = time.monotonic()
    results = run_benchmark(tools, args.runs, args.warmup, args.timeout, args.keep)
    elapsed = time.monotonic() - started
    checks = verdicts(results, have_torch)

    if args.json:
        summary = {
            sc.key: {
                tool: {
                    metric: {
                        "median_ms": statistics.median(values),
                        "min_ms": min(values),
                        "max_ms": max(values),
                        "samples_ms": values,
                    }
                    for metric, values in per_tool.items()
                }
                for tool, per_tool in results.samples.get(sc.key, {}).items()
            }
            for sc in SCENARIOS
        }
        print(json.dumps({
            "tools": {t.name: t.description for t in tools},
            "runs": args.runs,
            "warmup": args.warmup,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "elapsed_s": round(elapsed, 1),
            "results": summary,
            "targets": [v.__dict__ for v in checks],
            "errors": results.errors,
            "notes": notes,
        }, indent=2))  # fmt: skip
    else:
        print(f"elastic-run launch benchmark: {args.runs} runs (+{args.warmup} warm-up) each, "
              f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"{elapsed:.0f} s")  # fmt: skip
        for tool in tools:
            print(f"  {tool.name:<12} {tool.description}")
        for note in notes:
            print(f"  note: {note}")
        print(f"  torchrun 2.13 CPU reference (ms): a {TORCHRUN_REFERENCE['a']}, "
              f"b {TORCHRUN_REFERENCE['b']}, c {TORCHRUN_REFERENCE['c']}")  # fmt: skip
        print()
        print("\n".join(format_table(results, tools)))
        print()
        for v in checks:
            print(f"{v.metric:<9} {v.status:<5} {v.text}")
        if results.errors:
            print(f"\n{len(results.errors)} run(s) failed:")
            for e in results.errors:
                print(f"  {e.splitlines()[0]}")
    failed = results.errors or any(v.status == "FAIL" for v in checks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
