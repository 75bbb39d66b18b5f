"""A test worker that attacks the agent's timer FIFO on its first attempt, then arms a real
timer and blocks in ``train_step`` (so the timer fires); on a restart it exits 0:
``timer_attacker.py OUT MODE [ARG]``.

Modes:
  garbage        every malformed request of the red-team pass, one write each, then an
                 unterminated one
  signal N       a timer for this worker with signal N, due in 0.2 s, waited out
  pids BYSTANDER rank 0 arms SIGKILL timers for the agent, pid 1, BYSTANDER (a process
                 outside the job) and rank 1 (its sibling, scope "sibling"); rank 1 waits
  fifo           writes OUT/fifo.txt (its TORCHELASTIC_TIMER_FILE) and sleeps

Writes OUT/attacked_r<RANK> once its attack is sent.
"""

import json
import os
import sys
import time

out, mode = sys.argv[1], sys.argv[2]
arg = sys.argv[3] if len(sys.argv) > 3 else None
rank = int(os.environ["RANK"])
path = os.environ["TORCHELASTIC_TIMER_FILE"]
if os.environ["TORCHELASTIC_RESTART_COUNT"] != "0":
    sys.exit(0)


def send(data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def request(**fields: object) -> bytes:
    base = {
        "version": 1,
        "pid": os.getpid(),
        "scope_id": "attack",
        "expiration_time": time.time() + 0.2,
        "signal": 9,
    }
    base.update(fields)
    return json.dumps(base).encode() + b"\n"


def attacked() -> None:
    with open(os.path.join(out, f"attacked_r{rank}"), "w") as f:
        f.write(str(os.getpid()))


def train_step() -> None:
    time.sleep(30)


def real_timer() -> None:
    from elastic_runner.timer import expires

    with expires(after=0.5, scope="real"):
        train_step()


if mode == "garbage":
    for line in (
        b"not json\n",
        request(pid={"nested": [1, {"json": True}]}),
        b"[" * 3000 + b"]" * 3000 + b"\n",
        request(expiration_time=1e300),
        request(expiration_time=float("inf")),
        request(expiration_time=float("nan")),
        request(pid=2**31),
        request(pid=2**63),
        request(pid=-1),
        request(signal=99999),
        request(signal=2**63),
        request(signal=19),
        request(scope_id="x" * 3000),
        request(scope_id="y" * 5000),
    ):
        send(line)
    send(b'{"pid": ')  # no newline: must not corrupt the next request
    attacked()
    time.sleep(0.5)  # past every deadline the attack named
    real_timer()
elif mode == "signal":
    assert arg is not None
    send(request(signal=int(arg), scope_id=f"signal {arg}"))
    attacked()
    time.sleep(0.5)
    real_timer()
elif mode == "pids":
    assert arg is not None
    if rank == 1:
        attacked()
        train_step()
        sys.exit(0)
    sibling_file = os.path.join(out, "attacked_r1")
    while not os.path.exists(sibling_file):
        time.sleep(0.01)
    time.sleep(0.05)
    with open(sibling_file) as f:
        sibling = int(f.read())
    for pid, scope in ((os.getppid(), "agent"), (1, "init"), (int(arg), "bystander")):
        send(request(pid=pid, scope_id=scope))
    send(request(pid=sibling, scope_id="sibling", expiration_time=time.time() + 0.4, after=0.4))
    attacked()
    train_step()
elif mode == "fifo":
    with open(os.path.join(out, "fifo.txt"), "w") as f:
        f.write(path)
    train_step()
else:
    sys.exit(f"unknown mode {mode}")
