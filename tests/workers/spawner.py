"""A test worker that starts a long-lived descendant in one of four ways, records its pid,
then behaves as told.

``spawner.py OUT HOW THEN``: HOW is child | shell | setsid | doublefork; THEN is
exit0 | sleep | fail-first (exit 1 on restart 0, exit 0 after). On a restart it also
records whether the previous attempt's descendant is still alive.
"""

import json
import os
import subprocess
import sys
import time

out, how, then = sys.argv[1:4]
rank = os.environ["RANK"]
restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])


def double_fork() -> int:
    r, w = os.pipe()
    if os.fork() == 0:  # child
        os.setsid()
        if os.fork() == 0:  # grandchild: a daemon
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            time.sleep(60)
            os._exit(0)
        os._exit(0)
    os.close(w)
    pid = int(os.read(r, 32))
    os.wait()
    return pid


if how == "child":
    pid = subprocess.Popen(["sleep", "60"]).pid
elif how == "shell":  # the shell's background job is our grandchild
    sh = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    assert sh.stdout is not None
    pid = int(sh.stdout.readline())
elif how == "setsid":
    pid = subprocess.Popen(["sleep", "60"], start_new_session=True).pid
else:
    pid = double_fork()

record = {"descendant": pid}
if restart > 0:
    with open(os.path.join(out, f"a{restart - 1}_r{rank}.json")) as f:
        prev = json.load(f)["descendant"]
    try:
        with open(f"/proc/{prev}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        record["previous_alive"] = state != "Z"
    except FileNotFoundError:
        record["previous_alive"] = False
path = os.path.join(out, f"a{restart}_r{rank}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)

if then == "sleep":
    time.sleep(60)
elif then == "fail-first" and restart == 0:
    sys.exit(1)
