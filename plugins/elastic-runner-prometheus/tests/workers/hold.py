"""A worker that fails once as rank 1 when asked, then runs until a release file appears."""

import os
import sys
import time
from pathlib import Path

out = Path(sys.argv[1])
restart, rank = os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["RANK"]
if "--fail-first" in sys.argv and restart == "0" and rank == "1":
    sys.exit(3)
(out / f"running_{restart}_{rank}").touch()
while not (out / "release").exists():
    time.sleep(0.02)
