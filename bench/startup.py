"""Where ``elastic-run``'s start-up goes: milliseconds from starting the process to each
phase, medians of --runs, beside a bare ``@hydra.main`` app (Hydra's own floor).

Phases: interpreter up, ``elastic_runner.cli`` imported, plugins loaded, configs
registered in ConfigStore, Hydra composed (``run_job`` entered), first and last worker
spawned. They are marked by wrapping those functions in the measured process, so the
figures include the wrappers' few microseconds. Plugin autoload is on unless
``--no-autoload``. Workers are ``/bin/true``::

    .venv/bin/python bench/startup.py --runs 9
    .venv/bin/python bench/startup.py --runs 9 --nproc 4 --no-autoload
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

MARK = "@@startup"

PHASES = f"""\
import sys, time
T0 = float(sys.argv[1])
def mark(what):
    print("{MARK}", (time.time() - T0) * 1000, what, file=sys.__stderr__, flush=True)
mark("interpreter up")
import elastic_runner.cli as cli
from elastic_runner.workers import supervisor
mark("cli imported")
def wrap(owner, name, after):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        result = inner(*args, **kwargs)
        after(args)
        return result
    setattr(owner, name, wrapper)
wrap(cli, "load_plugins", lambda a: mark("plugins loaded"))
wrap(cli, "register_configs", lambda a: mark("configs registered"))
run_job = cli.run_job
def entered(*args):
    mark("composed: run_job entered")
    return run_job(*args)
cli.run_job = entered
spawned = []
def after_spawn(args):
    spawned.append(1)
    if len(spawned) == 1:
        mark("first worker spawned")
    mark("last worker spawned")  # overwritten by each spawn; the last one stays
wrap(supervisor.ProcessSupervisor, "_spawn", after_spawn)
sys.argv = ["elastic-run", *sys.argv[2:]]
cli.main()
"""

BARE = f"""\
import os, sys, time
T0 = float(sys.argv[1])
import hydra
@hydra.main(version_base="1.3", config_path=None, config_name=None)
def task(cfg):
    print("{MARK}", (time.time() - T0) * 1000, "bare Hydra app: task entered",
          file=sys.__stderr__, flush=True)
    os._exit(0)
sys.argv = [sys.argv[0], *sys.argv[2:]]
task()
"""


def run_once(code: str, args: list[str], env: dict[str, str]) -> dict[str, float]:
    """One process; {phase: ms since just before it was started} (the last mark wins)."""
    with tempfile.TemporaryDirectory(prefix="er-bench-startup-") as run_dir:
        t0 = time.time()
        done = subprocess.run(
            [sys.executable, "-c", code, repr(t0), *args, f"hydra.run.dir={run_dir}"],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    marks: dict[str, float] = {}
    for line in done.stderr.splitlines():
        if line.startswith(MARK):
            _, ms, what = line.split(" ", 2)
            marks[what] = float(ms)
    if not marks:
        raise SystemExit(f"no marks (exit {done.returncode}):\n{done.stderr}")
    return marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--no-autoload", action="store_true", help="built-in plugins only")
    args = p.parse_args()
    # without PYTHONDONTWRITEBYTECODE, so that the warm-up writes the .pyc files of modules
    # edited since (an installed package has them; compiling is not a start-up cost)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    if args.no_autoload:
        env["ELASTIC_RUNNER_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    job = ["job.entrypoint=/bin/true", f"job.nproc_per_node={args.nproc}", "logs.tee=false"]
    samples: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    for _ in range(args.runs + 1):  # the first pair is a warm-up
        marks = {**run_once(BARE, [], env), **run_once(PHASES, job, env)}
        if not order:
            order = list(marks)
            continue
        for what, ms in marks.items():
            samples[what].append(ms)
    print(
        f"elastic-run start-up: {args.runs} runs (+1 warm-up), N={args.nproc}, "
        f"autoload {'off' if args.no_autoload else 'on'}, Python {sys.version.split()[0]}"
    )
    print(f"{'ms since process start':40} {'median':>8} {'min':>8} {'max':>8}")
    for what in order:
        values = samples[what]
        print(f"{what:40} {statistics.median(values):8.1f} {min(values):8.1f} {max(values):8.1f}")


if __name__ == "__main__":
    main()
