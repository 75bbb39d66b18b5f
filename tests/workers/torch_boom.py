"""An unchanged torch script that fails after ``init_process_group("gloo")``:
``torch_boom.py OUT`` on 4 ranks. Ranks 0-2 raise ``ValueError: boom`` (torch's excepthook
prefixes their tracebacks with ``[rankN]: ``); rank 3 waits to be stopped.

Every raising rank has printed its traceback before any of them exits, whatever the
scheduling: each one's ``atexit`` (which runs after the excepthook) marks OUT/raised_r<RANK>
and waits for the others' marks. That is the premise of the test: the ranks that did not
exit first raised before the agent stopped the group."""

import atexit
import os
import sys
import time

import torch.distributed as dist

out = sys.argv[1]


def wait_for_the_other_raisers() -> None:
    open(os.path.join(out, f"raised_r{dist.get_rank()}"), "w").close()
    deadline = time.monotonic() + 30
    while not all(os.path.exists(os.path.join(out, f"raised_r{r}")) for r in range(3)):
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)


dist.init_process_group("gloo")
if dist.get_rank() != 3:
    atexit.register(wait_for_the_other_raisers)
    raise ValueError("boom")
time.sleep(60)
