"""A test worker whose child escapes every marker-based sweep, then behaves as told.

``escaper.py OUT HOW THEN``: HOW is

- ``env-i``: fork a child that execs ``env -i setsid sleep 300`` (no environment at all,
  its own session: no ``ELASTIC_RUNNER_AGENT`` to find it by, no process group to reach);
- ``overwrite``: the same with ``ELASTIC_RUNNER_AGENT`` and ``TORCHELASTIC_RUN_ID``
  overwritten instead of cleared;
- ``orphan``: ``env -i`` through a double fork, so the escaped process is an orphan
  (re-parented to the agent, a subreaper) in a session of its own.

THEN is exit0 | sleep | fail-first (exit 1 on restart 0, exit 0 after). The worker records
``{"pid", "start", "cgroup"}`` of the escaped process in ``OUT/a<restart>_r<rank>.json``
(``start``: its start time in clock ticks, so a reused pid is not mistaken for it); on a
restart also ``previous_alive``: whether the previous attempt's escaped process still is.
"""

import json
import os
import sys
import time

out, how, then = sys.argv[1:4]
rank = os.environ["RANK"]
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
ESCAPE = ["env", "-i", "setsid", "sleep", "300"]
OVERWRITE = [
    "env",
    "ELASTIC_RUNNER_AGENT=someone-else",
    "TORCHELASTIC_RUN_ID=someone-else",
    "setsid",
    "sleep",
    "300",
]


def escape(argv: list[str], orphan: bool) -> int:
    """Start ``argv`` in a forked child (a grandchild if ``orphan``); its pid. The child is
    not a group leader, so ``setsid`` needs no fork of its own and the pid stays the same
    through ``env`` and ``setsid`` to ``sleep``."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        if orphan and os.fork() != 0:
            os._exit(0)
        os.write(w, str(os.getpid()).encode())
        os.close(w)
        os.execvp(argv[0], argv)
    os.close(w)
    escaped = int(os.read(r, 32))
    os.close(r)
    if orphan:
        os.waitpid(pid, 0)
    return escaped


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks after boot); -1 for a zombie (it is dead)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return -1 if fields[0] == "Z" else int(fields[19])


def wait_exec(pid: int) -> None:
    """Until the escaped process runs ``sleep`` (it has left our session and environment)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].endswith(b"sleep"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.005)


pid = escape(OVERWRITE if how == "overwrite" else ESCAPE, orphan=how == "orphan")
wait_exec(pid)
with open(f"/proc/{pid}/cgroup") as f:
    cgroup = next((line[3:].strip() for line in f if line.startswith("0::")), "")
record: dict[str, object] = {"pid": pid, "start": start_time(pid), "cgroup": cgroup}
if restart > 0:  # is the previous attempt's escaped process still there?
    with open(os.path.join(out, f"a{restart - 1}_r{rank}.json")) as f:
        prev = json.load(f)
    try:
        record["previous_alive"] = start_time(prev["pid"]) == prev["start"]
    except (FileNotFoundError, ProcessLookupError):  # reaped
        record["previous_alive"] = False
path = os.path.join(out, f"a{restart}_r{rank}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)

if then == "sleep":
    time.sleep(300)
elif then == "fail-first" and restart == 0:
    sys.exit(1)
