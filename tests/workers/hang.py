"""A test worker that hangs in a chosen way on its first attempt, then succeeds:
``hang.py OUT MODE [RANKS]`` (only the listed global ranks hang; default all).

Modes: silent (prints once, then blocks in ``wait_for_peer``) | heartbeat (beats five
times, then blocks in ``wait_for_peer``) | timer (arms ``elastic_runner.timer.expires``
for 1 s around a 60 s block in ``train_step``, with a child process in its tree) |
torch-timer (the same through torch's FileTimerClient) | exit-first (the chosen ranks exit
3 at once, the others wait to be stopped; on the next attempt run until OUT/release
exists). Writes OUT/pids_r<RANK>.txt with its pid
and its child's pid.
"""

import os
import subprocess
import sys
import time

out, mode = sys.argv[1], sys.argv[2]
ranks = {int(r) for r in sys.argv[3].split(",")} if len(sys.argv) > 3 else None
rank = int(os.environ["RANK"])
print(f"rank {rank} started", flush=True)
if mode == "exit-first":
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        if ranks is None or rank in ranks:
            sys.exit(3)
        time.sleep(60)  # the others wait to be stopped with the group
    while not os.path.exists(os.path.join(out, "release")):
        time.sleep(0.02)
    sys.exit(0)
if os.environ["TORCHELASTIC_RESTART_COUNT"] != "0" or (ranks is not None and rank not in ranks):
    if ranks is not None and rank not in ranks and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        time.sleep(60)  # a healthy rank: chatty enough, waits to be stopped with the group
    sys.exit(0)


def wait_for_peer() -> None:
    while True:
        time.sleep(1)


def train_step() -> None:
    time.sleep(60)


if mode == "silent":
    wait_for_peer()
elif mode == "heartbeat":
    import elastic_runner

    for _ in range(5):
        elastic_runner.heartbeat()
        print("step", flush=True)
        time.sleep(0.05)
    wait_for_peer()
elif mode in ("timer", "torch-timer"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(out, f"pids_r{rank}.txt"), "w") as f:
        f.write(f"{os.getpid()} {child.pid}\n")
    if mode == "timer":
        from elastic_runner.timer import expires

        with expires(after=1, scope="train_step"):
            train_step()
    else:
        from torch.distributed.elastic import timer

        timer.configure(timer.FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"]))
        with timer.expires(after=1, scope="train_step"):
            train_step()
