"""Worker of ``bench/launch.py`` (not a test; run by elastic-run or torchrun).

Usage: ``_worker.py OUT_DIR MODE`` with MODE ``start``, ``kill`` or ``sleep``. The start time is
taken before any other import (``signal`` alone costs ~3 ms: it imports enum), so the
figures measure the launcher, not the worker's imports; only time, os, sys and signal
are used. Files written to OUT_DIR (each holds a float of ``time.time()``):

* ``a<restart>_r<rank>.start``: when this worker's user code began (both modes);
* ``kill``: (mode ``kill``, restart 0, rank 0) just before rank 0 SIGKILLs itself;
* ``a<restart>_r<rank>.term``: (mode ``kill``, restart 0, other ranks) when SIGTERM came.

Mode ``start``: record and exit 0. Mode ``sleep``: record, then sleep until signalled
(default dispositions: a SIGTERM ends it at once; used by ``bench/supervision.py``).
Mode ``kill``: on restart 0, rank 0 waits until every sibling has recorded its start (so
their SIGTERM handlers are installed), sleeps 0.3 s, records the kill time and SIGKILLs
itself; the other ranks sleep until SIGTERM, whose handler records the time and exits.
On later restarts every rank records and exits 0.
"""

import time

#: The first thing user code does: the instant "the worker executes user code".
T_START = time.time()

import os  # noqa: E402  (after the first timestamp on purpose)
import signal  # noqa: E402
import sys  # noqa: E402

#: Safety net: a worker never waits longer than this for its SIGTERM.
_MAX_WAIT_S = 60.0


def _write(path: str, value: float) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(repr(value))
    os.replace(tmp, path)


def main() -> int:
    out, mode = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    prefix = os.path.join(out, f"a{restart}_r{rank}")

    if mode == "kill" and restart == 0 and rank != 0:

        def on_term(signum: int, frame: object) -> None:
            _write(prefix + ".term", time.time())
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)  # before .start: rank 0 waits for it

    _write(prefix + ".start", T_START)
    if mode == "start" or restart > 0:
        return 0
    if mode == "sleep":
        time.sleep(_MAX_WAIT_S * 10)
        return 0
    if mode != "kill":
        print(f"_worker.py: unknown mode {mode!r}", file=sys.stderr)
        return 2

    if rank == 0:
        siblings = [os.path.join(out, f"a0_r{r}.start") for r in range(1, world)]
        deadline = time.monotonic() + _MAX_WAIT_S
        while not all(os.path.exists(p) for p in siblings):
            if time.monotonic() > deadline:
                return 3
            time.sleep(0.005)
        time.sleep(0.3)
        _write(os.path.join(out, "kill"), time.time())
        os.kill(os.getpid(), signal.SIGKILL)

    deadline = time.monotonic() + _MAX_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(1.0)
    return 4  # no SIGTERM came


if __name__ == "__main__":
    sys.exit(main())
