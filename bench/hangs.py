"""How fast hangs are caught: prints figures (medians of --runs).

(1) Timer server, expiry to kill: a child process arms a 0.5 s timer through the FIFO and
    sleeps; measured from the timer's expiration time to the child's death. Ours (the
    listener kills at once, as the agent does after its stack dump) against torch's
    FileTimerServer as torchrun's agent configures it (max_interval=0.1), run in
    --torch-python when given.
(2) elastic-run end to end, a silent hang with watchdog.no_output_timeout=T: from the
    workers' START events to the watchdog firing, minus T (the overshoot), for each
    watchdog.stacks mode; it includes dumping every rank's stacks, and is an upper
    bound: a worker's last output comes some milliseconds after its START.

    .venv/bin/python bench/hangs.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procs import sweep, torch_version

ROOT = Path(__file__).resolve().parents[1]
HANG = ROOT / "tests" / "workers" / "hang.py"
DEFAULT_TORCH = "/tmp/torchvenv/bin/python"

# Runs in a python of its own: arm a 0.5 s timer for a sleeping child through the FIFO
# of the server under test, then report when the child died relative to the expiration.
_TRIAL = r"""
import json, os, signal, subprocess, sys, tempfile, time
kind, runs = sys.argv[1], int(sys.argv[2])
TORCH_SERVER = (
    "import sys, time\n"
    "from torch.distributed.elastic.timer import FileTimerServer\n"
    "FileTimerServer(sys.argv[1], 'bench', max_interval=0.1, daemon=True).start()\n"
    "time.sleep(60)\n"
)
out, self_killed = [], 0
for _ in range(runs):
    path = os.path.join(tempfile.mkdtemp(), "timer.fifo")
    if kind == "torch":
        # its own process: torch's server signals the process it runs in after a kill
        server = subprocess.Popen([sys.executable, "-c", TORCH_SERVER, path])
        while not os.path.exists(path):
            time.sleep(0.005)
        time.sleep(0.2)  # its watchdog thread opens the FIFO after creating it
    else:
        from elastic_runner.timer.server import FileTimerServer
        server = FileTimerServer(path)
        server.on_expired(lambda e: os.kill(e.pid, signal.SIGKILL))
        server.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    expiration = time.time() + 0.5
    request = {"version": 1, "pid": child.pid, "scope_id": "bench",
               "expiration_time": expiration, "signal": 9}
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, (json.dumps(request) + "\n").encode())
    os.close(fd)
    child.wait()
    out.append(time.time() - expiration)
    if kind == "torch":
        try:
            code = server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
        self_killed += code == -signal.SIGKILL
    else:
        server.stop()
print(json.dumps({"latency": out, "self_killed": self_killed}))
"""


def timer_latency(python: str, kind: str, runs: int) -> tuple[list[float], int]:
    done = subprocess.run(
        [python, "-c", _TRIAL, kind, str(runs)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [float(x) for x in result["latency"]], int(result["self_killed"])


def hang_overshoot(exe: str, stacks: str, timeout: float, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        tmp = Path(tempfile.mkdtemp(prefix="er-bench-hang-"))
        try:
            subprocess.run(
                [exe, f"job.entrypoint={HANG}", f'job.args=["{tmp}","silent"]',
                 "job.nproc_per_node=2", f"watchdog.no_output_timeout={timeout}",
                 f"watchdog.stacks={stacks}", "max_restarts=0", f"hydra.run.dir={tmp}/run"],
                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            events = [json.loads(x) for x in (tmp / "run" / "events.jsonl").open()]
            # the worker prints once right after it starts: its START is its last output
            start = max(e["timestamp"] for e in events if e["name"].endswith(".START"))
            fired = min(
                e["timestamp"] for e in events if e["name"] == "elastic_runner.watchdog.fired"
            )
            out.append(fired - start - timeout)
        finally:
            sweep(str(tmp))
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1.0, help="watchdog.no_output_timeout")
    p.add_argument("--elastic-run", default=str(Path(sys.executable).with_name("elastic-run")))
    p.add_argument(
        "--torch-python",
        default=DEFAULT_TORCH if os.path.exists(DEFAULT_TORCH) else "",
        help="a python where torch imports ('' to skip)",
    )
    args = p.parse_args()

    def row(label: str, values: list[float]) -> None:
        ms = [v * 1000 for v in values]
        print(
            f"{label:<52} {statistics.median(ms):8.1f} {min(ms):8.1f} {max(ms):8.1f} {len(ms):3d}"
        )

    print(f"{'metric (ms)':<52} {'median':>8} {'min':>8} {'max':>8} {'n':>3}")
    print("-- (1) timer: expiration -> worker dead " + "-" * 40)
    ours, _ = timer_latency(sys.executable, "ours", args.runs)
    row("elastic-run FileTimerServer (select until due)", ours)
    version = torch_version(args.torch_python) if args.torch_python else None
    if version:
        theirs, self_killed = timer_latency(args.torch_python, "torch", args.runs)
        row(f"torch {version} FileTimerServer (max_interval=0.1)", theirs)
        print(f"  torch's server process then SIGKILLed itself in {self_killed}/{args.runs} runs")
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"{'ratio ours/torch':<52} {ratio:8.2f}x")
    else:
        print("torch: skipped (no --torch-python)")
    print(f"-- (2) silent hang: overshoot past no_output_timeout={args.timeout:g} s " + "-" * 22)
    modes = ["none", "faulthandler"]
    if shutil.which("py-spy") or Path(sys.executable).with_name("py-spy").exists():
        modes.append("py-spy")
    for mode in modes:
        row(f"elastic-run, watchdog.stacks={mode} (2 ranks)", hang_overshoot(
            args.elastic_run, mode, args.timeout, args.runs))  # fmt: skip
    print("torchrun has no equivalent: a silent rank is not detected until a collective's")
    print("own timeout (NCCL's default: 10 minutes), and no stacks are dumped.")


if __name__ == "__main__":
    main()
