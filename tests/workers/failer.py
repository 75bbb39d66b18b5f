"""A test worker that fails in a chosen way per rank: ``failer.py OUT RANK=MODE ...``.

Modes: ok | sleep | record (raise through elastic_runner.error_file) | record-then-hang (write
the error file, then hang like a rank stuck in cleanup) | traceback (raise, no error file)
| segv | selfkill | big-selfkill (120 MiB, then SIGKILL) | grow (allocate memory until
killed) | fail (exit 1) | late-record (wait 0.3 s, then raise through record). Every rank
writes OUT/started_r<RANK> first.
"""

import os
import signal
import sys
import time

out = sys.argv[1]
rank = int(os.environ["RANK"])
modes = dict(arg.split("=") for arg in sys.argv[2:])
mode = modes.get(str(rank), "ok")
open(os.path.join(out, f"started_r{rank}"), "w").close()
world = int(os.environ["WORLD_SIZE"])
while not all(os.path.exists(os.path.join(out, f"started_r{r}")) for r in range(world)):
    time.sleep(0.005)


def fail_with_record(message: str) -> None:
    from elastic_runner import record

    @record
    def main() -> None:
        raise ValueError(message)

    main()


if mode == "sleep":
    time.sleep(60)
elif mode == "record":
    fail_with_record(f"rank {rank} bad input")
elif mode == "late-record":
    time.sleep(0.3)
    fail_with_record(f"rank {rank} failed late")
elif mode == "record-then-hang":
    from elastic_runner.error_file import write_error_file

    try:
        raise RuntimeError(f"rank {rank} failed first")
    except RuntimeError as exc:
        write_error_file(exc)
    time.sleep(60)
elif mode == "traceback":
    empty: dict[str, int] = {}
    empty["missing key"]
elif mode == "segv":
    os.kill(os.getpid(), signal.SIGSEGV)
elif mode == "selfkill":
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "big-selfkill":  # as if the OOM killer took it at 120 MiB
    hog = b"\x01" * (120 << 20)
    os.kill(os.getpid(), signal.SIGKILL)
elif mode == "grow":
    hogs: list[bytes] = []
    for _ in range(200):  # at most 2 GB
        hogs.append(b"\x01" * (10 << 20))
        time.sleep(0.01)
    time.sleep(60)
elif mode == "fail":
    sys.exit(1)
