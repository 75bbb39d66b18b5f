"""A test worker: records what it saw, then behaves as told.

Writes ``<out>/a<RESTART_COUNT>_r<RANK>.json`` (argv, env, pid, start time), then:
``--exit-code N --ranks R,..`` exits N on those ranks; ``--sigkill-on-restart K`` SIGKILLs
itself when TORCHELASTIC_RESTART_COUNT == K (on ``--ranks``); ``--sleep S`` sleeps first
(on every rank, or on the others when ``--sleep-others``). ``--until-world W`` sleeps
60 s unless ``WORLD_SIZE`` is W (and, with ``--after-world M``, a world of M ran before).
"""

import argparse
import json
import os
import signal
import sys
import time
from types import FrameType

started = time.time()
p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--ranks", default="")
p.add_argument("--exit-code", type=int, default=0)
p.add_argument("--sigkill-on-restart", type=int, default=None)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--stderr", default="")
p.add_argument("--sleep-others", action="store_true", help="chosen ranks do not sleep")
p.add_argument("--wait-for-peers", action="store_true")
p.add_argument("--until-world", type=int, default=0, help="sleep unless WORLD_SIZE is this")
p.add_argument(
    "--after-world",
    type=int,
    default=0,
    help="--until-world counts only once a world of this size ran (a record of it is in --out)",
)
p.add_argument("--on-term", action="store_true", help="record the stop signal, exit 0")
args, rest = p.parse_known_args()

rank = int(os.environ["RANK"])
if args.on_term:  # installed first, so a signal can never beat it

    def on_term(signum: int, frame: FrameType | None) -> None:
        with open(os.path.join(args.out, f"term_r{rank}"), "w") as f:
            f.write(signal.Signals(signum).name)
        sys.exit(0)

    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), on_term)
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
chosen = rank in {int(r) for r in args.ranks.split(",") if r}
record = {
    "argv": sys.argv,
    "rest": rest,
    "env": dict(os.environ),
    "pid": os.getpid(),
    "started": started,
    "cwd": os.getcwd(),
    "executable": sys.executable,
    "orig_argv": sys.orig_argv,
}
node = f"_g{os.environ['GROUP_RANK']}_w{os.environ['WORLD_SIZE']}" if args.until_world else ""
path = os.path.join(args.out, f"a{restart}_r{rank}{node}.json")
# (a temporary file of this process's own: two jobs of a sweep may write the same record)
temporary = f"{path}.{os.getpid()}.tmp"
with open(temporary, "w") as f:
    json.dump(record, f)
os.replace(temporary, path)
print(f"probe rank {rank} restart {restart}", flush=True)
if args.wait_for_peers and chosen:  # act only once every rank of this attempt is up
    world = int(os.environ["WORLD_SIZE"])
    peers = [os.path.join(args.out, f"a{restart}_r{r}.json") for r in range(world)]
    while not all(os.path.exists(p) for p in peers):
        time.sleep(0.005)
if args.stderr and chosen:
    print(args.stderr, file=sys.stderr, flush=True)
if args.sigkill_on_restart == restart and chosen:
    os.kill(os.getpid(), signal.SIGKILL)
# A job that is to shrink may first form at the smaller size (its last node slow to
# start): those workers wait too, or the job would end before it grew.
grown = not args.after_world or any(
    name.endswith(f"_w{args.after_world}.json") for name in os.listdir(args.out)
)
if args.until_world and (int(os.environ["WORLD_SIZE"]) != args.until_world or not grown):
    time.sleep(60)
if args.sleep and not (args.sleep_others and chosen):
    time.sleep(args.sleep)
sys.exit(args.exit_code if chosen else 0)
