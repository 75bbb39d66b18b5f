"""Faults of a 3-node job on namespaced hosts: detection, recovery, overlap, who fenced.

A benchmark, not a test. Each run makes 3 hosts as network namespaces on a bridge
(:class:`elastic_runner.testing.netns.Cluster`), starts one ``elastic-run`` agent per
host (``rdzv=tcp rdzv.endpoint=host0:29400 nnodes=2:3``, one ``sleep 600`` worker per
node, ``rdzv.last_call_timeout=0.5``), waits until all 3 nodes run one world, injects one
fault at wall-clock time t0 (``time.time()``), measures, then stops everything (SIGTERM
to every agent, wait) and removes the hosts. host0 hosts the store; host2 never does.

Faults:

1. ``cut host2``: host2's link goes down; restored 3 x heartbeat_timeout after t0.
2. ``freeze host2 agent``: SIGSTOP host2's agent process only (its guardian and worker go
   on); SIGCONT 3 x heartbeat_timeout after t0.
3. ``SIGKILL host2 agent``: the node is lost; its workers die with it (their parent-death
   signal; the guardian sweeps whatever would be left).
4. ``SIGTERM host2 agent``: a node stopped by a signal (it leaves the job on purpose).
5. ``cut host0``: the store host; the others should fail naming the endpoint after
   heartbeat_timeout + rdzv.join_timeout. Stays cut until the survivors exit.

``rdzv.join_timeout`` is ``--join-timeout`` (10 s, short) for fault 5, and
``--rejoin-join-timeout`` (30 s) for faults 1-4: a node fenced off its store retries it
for rdzv.join_timeout, then exits; with 10 s, host2 cut for 15 s gives up (at about
heartbeat_timeout + 10 s) before its link comes back, and never rejoins.

Figures, in seconds from t0 (agents' event times are ``time.time()`` of the same machine):

- detection: the earliest ``elastic_runner.membership.changed`` or ``elastic_runner.restart``
  event of a survivor after t0 (fault 5: or a survivor's exit, whichever comes first);
- old worker gone: when the faulted node's worker was seen dead (its pid polled every
  10 ms; a zombie counts as dead);
- running again: the later of the survivors' first worker START after t0 (fault 5: "-");
- overlap: how long the faulted node's old worker still ran after the first of the
  survivors' new workers started (its pid polled every 10 ms from before t0; 0 when it
  died first); the target is 0;
- rejoined (faults 1, 2): the later of the survivors' first RENDEZVOUS with
  group_world_size 3 after t0 (the job runs on 3 nodes again after restore/thaw);
- exited (fault 5): the later of the survivors' agents' exits, as polled every 10 ms;
- fenced by: who killed the faulted node's worker, from its events.jsonl and stderr.

Reproduce from the repository root, as root (namespaces need it; 3 runs take ~4 min)::

    .venv/bin/python bench/faults.py --runs 3
    .venv/bin/python bench/faults.py --runs 1 --faults kill,term     # quick
    .venv/bin/python bench/faults.py --json                          # raw per-run figures

Progress goes to stderr. Everything is removed even on Ctrl-C or an error: the cluster
kills every process in its namespaces, and any process of the runs' ids (or mentioning
the temp dir) still alive afterwards is killed and reported. Exit status 1 when a run
left a process behind or could not be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import psutil
from _procs import sweep  # bench/ is on the path: scripts run from it

from elastic_runner.events import names
from elastic_runner.testing.netns import Cluster, NetnsUnavailable
from elastic_runner.testing.runner import elastic_run_exe, processes_of_runs

ROOT = Path(__file__).resolve().parents[1]
PORT = 29400
HOSTS = ("host0", "host1", "host2")
TMP_PREFIX = "er-bench-faults-"
POLL = 0.01  # the worker pid and the agents' exits
READ = 0.1  # the agents' events.jsonl
START = names.status("START")
FENCE_LINE = "did not renew its membership"
SWEEP_LINE = "died; killed"
#: Every run id started, for the final sweep (also of a run an exception interrupted).
RUN_IDS: set[str] = set()


@dataclass(frozen=True)
class Fault:
    key: str
    label: str
    target: str  # the faulted host
    undo_after: float | None  # x heartbeat_timeout after t0; None: not undone
    new_world: bool  # the survivors should run again without it
    rejoin: bool  # the faulted node should join again after the undo
    survivors_exit: bool  # the survivors should fail and exit

    @property
    def survivors(self) -> tuple[str, ...]:
        return tuple(h for h in HOSTS if h != self.target)


FAULTS = [
    Fault("cut", "1 cut host2", "host2", 3.0, True, True, False),
    Fault("freeze", "2 freeze host2 agent", "host2", 3.0, True, True, False),
    Fault("kill", "3 SIGKILL host2 agent", "host2", None, True, False, False),
    Fault("term", "4 SIGTERM host2 agent", "host2", None, True, False, False),
    Fault("cut0", "5 cut host0 (store)", "host0", None, False, False, True),
]
FIGURES = ("detection", "gone", "running_again", "overlap", "rejoined", "exited")
HEADINGS = {
    "detection": "detection",
    "gone": "old worker gone",
    "running_again": "running again",
    "overlap": "overlap",
    "rejoined": "rejoined",
    "exited": "exited",
}


@dataclass
class Result:
    """The figures of one run of one fault (seconds from t0; None: not measured)."""

    fault: str
    run: int
    run_id: str
    detection: float | None = None
    gone: float | None = None
    running_again: float | None = None
    overlap: float | None = None
    rejoined: float | None = None
    exited: float | None = None
    fenced_by: str = "?"
    #: Why a figure is None although the fault should produce it: {figure: reason}.
    missing: dict[str, str] = field(default_factory=dict)
    #: Everything else observed (raw times from t0, per host), for --json.
    raw: dict[str, Any] = field(default_factory=dict)
    #: Processes of the run still alive after the stop (killed then): a failure.
    leftovers: list[str] = field(default_factory=list)


class Job:
    """One agent per host of ``cluster``, sharing a run id; outputs under ``base``."""

    def __init__(
        self, cluster: Cluster, base: Path, exe: str, args: argparse.Namespace, join: float
    ) -> None:
        self.cluster = cluster
        self.join_timeout = join
        self.run_id = f"faults-{uuid.uuid4().hex[:10]}"
        RUN_IDS.add(self.run_id)
        self.base = base
        self.exe = exe
        self.args = args
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.run_dirs: dict[str, Path] = {}
        self._files: list[TextIO] = []

    def start(self) -> None:
        a = self.args
        for host in self.cluster:
            run_dir = self.base / host.name
            run_dir.mkdir(parents=True)
            argv = [
                self.exe,
                "job.entrypoint=sleep",
                "job.args=[600]",
                "job.nproc_per_node=1",
                "rdzv=tcp",
                f"rdzv.endpoint=host0:{PORT}",
                "nnodes=2:3",
                f"rdzv.heartbeat_interval={a.heartbeat_interval:g}",
                f"rdzv.heartbeat_timeout={a.heartbeat_timeout:g}",
                f"rdzv.join_timeout={self.join_timeout:g}",
                "rdzv.last_call_timeout=0.5",
                f"rdzv.id={self.run_id}",
                f"hydra.run.dir={run_dir}",
            ]
            out = open(self.base / f"{host.name}.stdout", "w")  # noqa: SIM115
            err = open(self.base / f"{host.name}.stderr", "w")  # noqa: SIM115
            self._files += [out, err]
            # stderr to a file: the guardian inherits it and writes its lines there too
            self.agents[host.name] = host.popen(argv, stdout=out, stderr=err)
            self.run_dirs[host.name] = run_dir

    def events(self, host: str) -> list[dict[str, Any]]:
        path = self.run_dirs[host] / "events.jsonl"
        out = []
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line being written
                    out.append(json.loads(line))
        return out

    def stderr(self, host: str) -> str:
        with contextlib.suppress(OSError):
            return (self.base / f"{host}.stderr").read_text(errors="replace")
        return ""

    def formed(self) -> bool:
        """Every node runs a worker in a world of 3 (its last round had 3 nodes and a
        START followed it)."""
        for host in HOSTS:
            events = self.events(host)
            rounds = [i for i, e in enumerate(events) if e["name"] == names.RENDEZVOUS_COMPLETE]
            if not rounds or int(events[rounds[-1]]["metadata"]["group_world_size"]) != 3:
                return False
            if not any(e["name"] == START for e in events[rounds[-1] :]):
                return False
        return True

    def worker(self, host: str) -> psutil.Process:
        """The process of ``host``'s latest worker (from its START event)."""
        start = [e for e in self.events(host) if e["name"] == START][-1]
        return psutil.Process(int(start["metadata"]["pid"]))

    def stop(self) -> list[str]:
        """SIGTERM every agent still running, wait; then kill whatever of the run is
        left (returned, described)."""
        for proc in self.agents.values():
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.agents.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()
        return kill_leftovers(self.run_id, str(self.base))


def kill_leftovers(run_id: str, marker: str, within: float = 5.0) -> list[str]:
    """Processes of ``run_id`` alive ``within`` s from now: killed, and described."""
    deadline = time.monotonic() + within
    while (left := processes_of_runs({run_id})) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"pid {proc.pid} {' '.join(proc.cmdline())[:120]}")
            proc.kill()
    found = sweep(marker)  # anything that still names the run's directory
    if found:
        described.append(f"{found} process(es) mentioning {marker}")
    return described


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _first(
    events: list[dict[str, Any]], t0: float, match: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    return next((e for e in events if float(e["timestamp"]) > t0 and match(e)), None)


def _is_start(e: dict[str, Any]) -> bool:
    return bool(e["name"] == START)


def _is_detection(e: dict[str, Any]) -> bool:
    return e["name"] in (names.MEMBERSHIP_CHANGED, names.RESTART)


def _is_world_of_3(e: dict[str, Any]) -> bool:
    return bool(
        e["name"] == names.RENDEZVOUS_COMPLETE and int(e["metadata"]["group_world_size"]) == 3
    )


def firsts_of(events: list[dict[str, Any]], t0: float) -> dict[str, dict[str, Any] | None]:
    """A survivor's first detection event, worker START and 3-node round after ``t0``."""
    return {
        "detection": _first(events, t0, _is_detection),
        "start": _first(events, t0, _is_start),
        "world3": _first(events, t0, _is_world_of_3),
    }


def inject(fault: Fault, cluster: Cluster, job: Job) -> None:
    agent = job.agents[fault.target]
    if fault.key in ("cut", "cut0"):
        cluster.cut(fault.target)
    elif fault.key == "freeze":
        cluster.freeze(agent)
    elif fault.key == "kill":
        agent.kill()
    elif fault.key == "term":
        agent.send_signal(signal.SIGTERM)
    else:
        raise ValueError(fault.key)


def undo(fault: Fault, cluster: Cluster, job: Job) -> None:
    if fault.key in ("cut", "cut0"):
        cluster.restore(fault.target)
    elif fault.key == "freeze":
        cluster.thaw(job.agents[fault.target])


def run_one(fault: Fault, run: int, args: argparse.Namespace, exe: str, tmp: Path) -> Result:
    base = tmp / f"{fault.key}-{run}"
    with Cluster(len(HOSTS), names=HOSTS) as cluster:
        join = args.join_timeout if fault.survivors_exit else args.rejoin_join_timeout
        job = Job(cluster, base, exe, args, join)
        result = Result(fault.key, run, job.run_id)
        try:
            job.start()
            measure(fault, cluster, job, args, result)
        finally:
            result.leftovers = job.stop()
    return result


def measure(
    fault: Fault, cluster: Cluster, job: Job, args: argparse.Namespace, result: Result
) -> None:
    hbt = args.heartbeat_timeout
    deadline = time.monotonic() + args.form_timeout
    while not job.formed():
        if time.monotonic() > deadline or any(p.poll() is not None for p in job.agents.values()):
            why = f"the job did not form with 3 nodes within {args.form_timeout:g} s"
            result.missing = {f: why for f in FIGURES}
            result.raw["stderr_tails"] = {h: job.stderr(h)[-500:] for h in HOSTS}
            return
        time.sleep(0.1)
    time.sleep(args.settle)  # a few heartbeats into the round
    if not job.formed():
        result.missing = {f: "the 3-node world changed before the fault" for f in FIGURES}
        return
    workers = {h: job.worker(h) for h in HOSTS}
    survivors = fault.survivors

    t0 = time.time()
    inject(fault, cluster, job)
    injected = time.time()
    undo_at = None if fault.undo_after is None else t0 + fault.undo_after * hbt
    undone: float | None = None
    budget = (fault.undo_after or 0) * hbt + hbt + job.join_timeout + 30
    end = t0 + budget
    gone: dict[str, float] = {}
    exits: dict[str, float] = {}
    firsts: dict[str, dict[str, dict[str, Any] | None]] = {}
    next_read = 0.0
    try:
        while True:
            now = time.time()
            for host, proc in workers.items():
                if host not in gone and not _alive(proc):
                    gone[host] = now
            for host in HOSTS:  # the faulted node's too: it may give up (rejoin faults)
                if host not in exits and job.agents[host].poll() is not None:
                    exits[host] = now
            if undo_at is not None and undone is None and now >= undo_at:
                undo(fault, cluster, job)
                undone = time.time()
            if now >= next_read:
                next_read = now + READ
                firsts = {h: firsts_of(job.events(h), t0) for h in survivors}
                done = fault.target in gone
                if fault.new_world:
                    done = done and all(firsts[h]["start"] for h in survivors)
                if fault.rejoin:
                    rejoined = undone is not None and all(firsts[h]["world3"] for h in survivors)
                    done = done and (rejoined or fault.target in exits)  # or it gave up
                if fault.survivors_exit:
                    done = done and all(h in exits for h in survivors)
                if done or now > end:
                    break
            time.sleep(POLL)
        time.sleep(0.3)  # the faulted node's last lines (the guardian's, its events)
    finally:
        if undo_at is not None and undone is None:
            undo(fault, cluster, job)
    result.raw["inject_s"] = injected - t0
    result.raw["budget_s"] = budget
    result.fenced_by = fenced_by(fault, job, t0, gone.get(fault.target))
    figures(fault, job, result, t0, firsts, gone, exits, undone)


def figures(
    fault: Fault,
    job: Job,
    result: Result,
    t0: float,
    firsts: dict[str, dict[str, dict[str, Any] | None]],
    gone: dict[str, float],
    exits: dict[str, float],
    undone: float | None,
) -> None:
    survivors = fault.survivors

    def at(event: dict[str, Any] | None) -> float | None:
        return None if event is None else float(event["timestamp"]) - t0

    raw = result.raw
    raw["undone_s"] = None if undone is None else undone - t0
    raw["workers_gone_s"] = {h: t - t0 for h, t in gone.items()}
    raw["agents_exited_s"] = {h: t - t0 for h, t in exits.items()}
    raw["per_survivor"] = {
        h: {
            "detection_s": at(firsts[h]["detection"]),
            "detection_event": None
            if firsts[h]["detection"] is None
            else firsts[h]["detection"]["name"]  # type: ignore[index]
            + str(firsts[h]["detection"]["metadata"] or ""),  # type: ignore[index]
            "new_start_s": at(firsts[h]["start"]),
            "world_of_3_s": at(firsts[h]["world3"]),
        }
        for h in survivors
    }

    detected = [t for h in survivors if (t := at(firsts[h]["detection"])) is not None]
    if fault.survivors_exit:
        detected += [exits[h] - t0 for h in survivors if h in exits]
    if detected:
        result.detection = min(detected)
    else:
        result.missing["detection"] = "no membership.changed/restart event on the survivors"

    if fault.target in gone:
        result.gone = gone[fault.target] - t0
    else:
        result.missing["gone"] = (
            f"{fault.target}'s old worker was still alive {raw['budget_s']:.0f} s after t0"
        )

    starts = {h: at(firsts[h]["start"]) for h in survivors}
    if fault.new_world:
        missing = [h for h, t in starts.items() if t is None]
        if missing:
            result.missing["running_again"] = f"no new worker START on {', '.join(missing)}"
        else:
            result.running_again = max(t for t in starts.values() if t is not None)
        if fault.target not in gone:
            result.missing["overlap"] = (
                f"{fault.target}'s old worker was still alive {raw['budget_s']:.0f} s after t0"
            )
        elif any(t is not None for t in starts.values()):
            new_world = min(t for t in starts.values() if t is not None)
            raw["new_world_s"] = new_world
            raw["margin_s"] = new_world - (gone[fault.target] - t0)
            result.overlap = max(0.0, gone[fault.target] - t0 - new_world)
        else:
            result.missing["overlap"] = "the survivors started no new workers"

    if fault.rejoin:
        world3 = {h: at(firsts[h]["world3"]) for h in survivors}
        missing = [h for h, t in world3.items() if t is None]
        if missing and fault.target in exits:
            last = (job.stderr(fault.target).strip().splitlines() or ["?"])[-1]
            result.missing["rejoined"] = (
                f"{fault.target}'s agent exited (code {job.agents[fault.target].returncode}) "
                f"{exits[fault.target] - t0:.1f} s after t0, restored at {raw['undone_s']:.1f} "
                f"s: {last.strip()}"
            )
        elif missing:
            result.missing["rejoined"] = f"no 3-node RENDEZVOUS after t0 on {', '.join(missing)}"
        else:
            result.rejoined = max(t for t in world3.values() if t is not None)

    if fault.survivors_exit:
        missing = [h for h in survivors if h not in exits]
        if missing:
            result.missing["exited"] = f"{', '.join(missing)} still running at the deadline"
        else:
            result.exited = max(exits[h] for h in survivors) - t0
        endpoint = f"host0:{PORT}"
        last_lines = {
            h: (job.stderr(h).strip().splitlines() or [""])[-1] for h in survivors if h in exits
        }
        raw["survivors_last_line"] = last_lines
        raw["survivors_exit_codes"] = {h: job.agents[h].returncode for h in survivors if h in exits}
        raw["endpoint_named"] = all(endpoint in line for line in last_lines.values())


def fenced_by(fault: Fault, job: Job, t0: float, gone: float | None) -> str:
    """Who killed the faulted node's worker, from its events.jsonl and its stderr (which
    the guardian shares), as they are before the benchmark's own stop; ``gone``: when
    the worker was seen dead."""
    if gone is None:
        return "not killed"
    err = job.stderr(fault.target)
    events = [e for e in job.events(fault.target) if float(e["timestamp"]) > t0]
    seen = {e["name"] for e in events}
    guardian = FENCE_LINE in err
    fenced = [float(e["timestamp"]) for e in events if e["name"] == names.FENCED]
    # The agent's fenced event counts only when it came before the worker was seen dead
    # (a thawed agent reports the lapse long after its guardian acted).
    agent = bool(fenced) and fenced[0] <= gone
    if guardian and agent:
        return "guardian+agent"
    if guardian:
        return "guardian"
    if agent:
        return "agent"
    if SWEEP_LINE in err:
        return "guardian sweep"
    if fault.key == "kill":
        # The agent's worker has PR_SET_PDEATHSIG=SIGKILL: it dies with its agent, and
        # the guardian's sweep finds nothing left (so it prints nothing).
        return "pdeathsig"
    if names.SIGNAL in seen:
        return "signal"
    if names.MEMBERSHIP_CHANGED in seen:
        return "agent re-form"
    return "?"


# -- output -------------------------------------------------------------------------------


def cell(values: list[float | None], note: int | None) -> str:
    got = [v for v in values if v is not None]
    mark = f" [{note}]" if note is not None else ""
    if not got:
        return "?" + mark
    text = f"{statistics.median(got):.2f}"
    if len(got) > 1:
        text += f" ({min(got):.2f}-{max(got):.2f})"
    return text + mark


def counts(labels: list[str]) -> str:
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return ", ".join(f"{label} {n}/{len(labels)}" for label, n in seen.items())


def applies(fault: Fault, figure: str) -> bool:
    return {
        "detection": True,
        "gone": True,
        "running_again": fault.new_world,
        "overlap": fault.new_world,
        "rejoined": fault.rejoin,
        "exited": fault.survivors_exit,
    }[figure]


def table(faults: list[Fault], results: list[Result]) -> str:
    notes: list[str] = []
    rows = []
    for fault in faults:
        mine = [r for r in results if r.fault == fault.key]
        row = [fault.label]
        for figure in FIGURES:
            if not applies(fault, figure):
                row.append("-")
                continue
            values: list[float | None] = [getattr(r, figure) for r in mine]
            reasons = sorted({r.missing[figure] for r in mine if figure in r.missing})
            note = None
            if reasons:
                n_missing = sum(figure in r.missing for r in mine)
                notes.append(
                    f"{fault.label}, {HEADINGS[figure]}: not measured in {n_missing}/"
                    f"{len(mine)} run(s): " + "; ".join(reasons)
                )
                note = len(notes)
            row.append(cell(values, note))
        row.append(counts([r.fenced_by for r in mine]))
        rows.append(row)
    head = ["fault", *(HEADINGS[f] for f in FIGURES), "fenced by (runs)"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)
                  for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [head, *rows]
    ]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = lines
    margins = {
        f.label: [r.raw["margin_s"] for r in results if r.fault == f.key and "margin_s" in r.raw]
        for f in faults
    }
    if any(margins.values()):
        out.append(
            "margin = survivors' first new worker START - faulted node's old worker gone "
            "(overlap is its negative part), min over runs: "
            + "; ".join(f"{label} {min(m):.3f}" for label, m in margins.items() if m)
        )
    for fault in faults:
        mine = [r for r in results if r.fault == fault.key]
        if fault.survivors_exit:
            named = [r.raw.get("endpoint_named") for r in mine if "endpoint_named" in r.raw]
            codes = sorted(
                {c for r in mine for c in r.raw.get("survivors_exit_codes", {}).values()}
            )
            out.append(
                f"{fault.label}: survivors' exit codes {codes}; last stderr line names "
                f"host0:{PORT} in {sum(bool(n) for n in named)}/{len(named)} run(s)"
            )
    for i, text in enumerate(notes, 1):
        out.append(f"[{i}] {text}")
    return "\n".join(out)


def reproduce(args: argparse.Namespace) -> str:
    python = os.path.relpath(sys.executable, ROOT)
    script = os.path.relpath(__file__, ROOT)
    argv = [
        python if not python.startswith("..") else sys.executable,
        script,
        f"--runs={args.runs}",
        f"--heartbeat-interval={args.heartbeat_interval:g}",
        f"--heartbeat-timeout={args.heartbeat_timeout:g}",
        f"--join-timeout={args.join_timeout:g}",
        f"--rejoin-join-timeout={args.rejoin_join_timeout:g}",
    ]
    if args.faults != ",".join(f.key for f in FAULTS):
        argv.append(f"--faults={args.faults}")
    return shlex.join(argv)


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3, help="runs per fault (3)")
    p.add_argument("--heartbeat-interval", type=float, default=1.0, help="rdzv.* s (1)")
    p.add_argument("--heartbeat-timeout", type=float, default=5.0, help="rdzv.* s (5)")
    p.add_argument("--join-timeout", type=float, default=10.0, help="fault 5: rdzv.* s (10)")
    p.add_argument(
        "--rejoin-join-timeout", type=float, default=30.0,
        help="faults 1-4: rdzv.join_timeout, s (30; below 2 x heartbeat timeout, a node cut "
        "for 3 x heartbeat timeout gives up before it is restored)",
    )  # fmt: skip
    p.add_argument(
        "--faults", default=",".join(f.key for f in FAULTS),
        help="comma-separated subset of " + ",".join(f.key for f in FAULTS),
    )  # fmt: skip
    p.add_argument("--form-timeout", type=float, default=60.0, help="s to form 3 nodes (60)")
    p.add_argument("--settle", type=float, default=1.0, help="s between forming and fault (1)")
    p.add_argument("--elastic-run", default=None, help="executable (default: beside python)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (agents' outputs)")
    p.add_argument("--json", action="store_true", help="print the raw per-run figures as JSON")
    args = p.parse_args(argv)
    keys = {f.key for f in FAULTS}
    chosen = args.faults.split(",")
    if args.runs < 1 or not set(chosen) <= keys:
        p.error(f"--runs must be >= 1 and --faults a subset of {sorted(keys)}")
    if args.heartbeat_timeout <= args.heartbeat_interval:
        p.error("--heartbeat-timeout must exceed --heartbeat-interval")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    faults = [f for f in FAULTS if f.key in args.faults.split(",")]
    exe = args.elastic_run or elastic_run_exe()
    signal.signal(signal.SIGTERM, _interrupt)  # cleanup runs on SIGTERM as on Ctrl-C
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    results: list[Result] = []
    started = time.monotonic()
    try:
        for run in range(1, args.runs + 1):
            for fault in faults:
                print(f"run {run}/{args.runs}: {fault.label} ...", file=sys.stderr, flush=True)
                r = run_one(fault, run, args, exe, tmp)
                results.append(r)
                shown = {f: getattr(r, f) for f in FIGURES if getattr(r, f) is not None}
                print(
                    "  " + ", ".join(f"{k} {v:.2f}" for k, v in shown.items())
                    + f", fenced by {r.fenced_by}"
                    + (f"; LEFT BEHIND: {r.leftovers}" if r.leftovers else ""),
                    file=sys.stderr, flush=True,
                )  # fmt: skip
    except NetnsUnavailable as exc:
        print(f"cannot make hosts here: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: hosts and processes removed", file=sys.stderr)
        return 130
    finally:
        left = [p for run_id in sorted(RUN_IDS) for p in kill_leftovers(run_id, str(tmp), 0)]
        if left:
            print(f"killed leftovers: {left}", file=sys.stderr)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started
    settings = (
        f"rdzv.heartbeat_interval={args.heartbeat_interval:g} "
        f"rdzv.heartbeat_timeout={args.heartbeat_timeout:g} "
        f"rdzv.join_timeout={args.rejoin_join_timeout:g} (fault 5: {args.join_timeout:g}) "
        "rdzv.last_call_timeout=0.5"
    )
    if args.json:
        print(json.dumps({
            "settings": settings,
            "reproduce": reproduce(args),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "elapsed_s": round(elapsed, 1),
            "results": [asdict(r) for r in results],
        }, indent=2))  # fmt: skip
    else:
        print(
            f"elastic-run faults: 3 hosts (network namespaces), 1 sleep worker each, "
            f"nnodes=2:3, rdzv=tcp on host0:{PORT}; {settings}; restore/thaw at "
            f"{3 * args.heartbeat_timeout:g} s; {args.runs} run(s) per fault, "
            f"{os.cpu_count()} CPUs, {elapsed:.0f} s"
        )
        print("seconds from the fault (t0): median (min-max)")
        print(table(faults, results))
        print(
            "fenced by: guardian = its 'did not renew its membership' line (it SIGKILLed "
            "the worker); agent = an elastic_runner.fenced event before the worker was seen "
            "dead; guardian+agent = both; guardian sweep = its 'agent ... died; killed' "
            "line; pdeathsig = neither, after a SIGKILLed agent: the worker died with it "
            "(the kernel's parent-death signal); signal = the agent got the stop signal and "
            "stopped its workers; agent re-form = the faulted node's own agent re-formed "
            "(membership.changed) and stopped them"
        )
        print(f"reproduce: {reproduce(args)}")
    bad = any(r.leftovers or len(r.missing) for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
