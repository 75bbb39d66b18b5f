"""A training script that reports steps and fails: ``stepper.py FAIL_AT GROWTH``.

Each attempt reports steps 1.. and rank 1 fails at step ``FAIL_AT + GROWTH * restart``
(GROWTH 0: always at the same step, a crash loop; 1: one step further each restart).
The other ranks wait to be stopped."""

from __future__ import annotations

import os
import sys
import time

from elastic_runner import heartbeat

fail_at = int(sys.argv[1]) + int(sys.argv[2]) * int(os.environ["TORCHELASTIC_RESTART_COUNT"])
for step in range(1, fail_at + 1):
    heartbeat(step=step)
if os.environ["RANK"] == "1":
    raise RuntimeError(f"loss is NaN at step {fail_at}")
time.sleep(60)
