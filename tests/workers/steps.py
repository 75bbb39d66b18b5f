"""A worker that reports a step every 50 ms for ``steps.py N`` steps (20 by default),
then prints ``done RANK RESTART`` and exits 0."""

from __future__ import annotations

import os
import sys
import time

from elastic_runner import heartbeat

for step in range(1, int(sys.argv[1] if len(sys.argv) > 1 else 20) + 1):
    heartbeat(step=step)
    time.sleep(0.05)
print("done", os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"], flush=True)
