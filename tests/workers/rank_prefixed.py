"""A test worker that fails like an unchanged torch script after ``init_process_group``,
without torch: ``rank_prefixed.py OUT MODE`` on 4 ranks. Its uncaught exceptions go
through a copy of the excepthook torch 2.x installs (torch/distributed/distributed_c10d.py),
which prefixes every line with ``[rank<RANK>]: ``.

Modes:

- boom: ranks 1 and 2 raise ``ValueError: boom`` and then hang in their teardown (as a
  rank can in a process group's teardown) until the agent stops them; rank 0 raises the
  same error once they have printed theirs, exits at once, and prints a C++-style
  ``[rank0]:[W...]`` warning at exit, after its traceback; rank 3 waits to be stopped.
- interrupt: ranks 1-3 turn SIGTERM into ``KeyboardInterrupt`` (as some training scripts
  do) and wait; rank 0 raises ``KeyboardInterrupt`` once they are ready. Their own
  ``KeyboardInterrupt`` comes after the agent's stop, so it is no failure.

Ranks mark their steps in OUT (``raised_r<RANK>``, ``ready_r<RANK>``).
"""

import atexit
import io
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])


def install_torch_excepthook() -> None:
    """torch's ``_distributed_excepthook``, as ``init_process_group`` installs it."""
    old_hook = sys.excepthook
    excepthook_prefix = f"[rank{rank}]"

    def _distributed_excepthook(*args: Any) -> None:
        old_stderr = sys.stderr
        sys.stderr = buf = io.StringIO()
        try:
            old_hook(*args)
        finally:
            sys.stderr = old_stderr
        msg = buf.getvalue()
        msg = "\n".join(f"{excepthook_prefix}: {s}" if s != "" else "" for s in msg.split("\n"))
        sys.stderr.write(msg)
        sys.stderr.flush()

    sys.excepthook = _distributed_excepthook


def mark(step: str) -> None:
    open(os.path.join(out, f"{step}_r{rank}"), "w").close()


def wait_for(step: str, ranks: list[int]) -> None:
    deadline = time.monotonic() + 30
    while not all(os.path.exists(os.path.join(out, f"{step}_r{r}")) for r in ranks):
        assert time.monotonic() < deadline, f"ranks {ranks} never reached {step}"
        time.sleep(0.005)


def hang_in_teardown() -> None:
    mark("raised")  # atexit runs after the excepthook printed the traceback
    time.sleep(60)


def warn_at_exit() -> None:
    sys.stderr.write(
        f"[rank{rank}]:[W1203 10:11:12.345678000 {os.getpid()} ProcessGroup.cpp:1250] "
        "Warning: destroy_process_group() was not called before program exit\n"
    )


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


install_torch_excepthook()
if mode == "boom":
    if rank in (1, 2):
        atexit.register(hang_in_teardown)
        raise ValueError("boom")
    if rank == 0:
        wait_for("raised", [1, 2])
        atexit.register(warn_at_exit)
        raise ValueError("boom")
    time.sleep(60)
elif mode == "interrupt":
    if rank == 0:
        wait_for("ready", [1, 2, 3])
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    mark("ready")
    time.sleep(60)
