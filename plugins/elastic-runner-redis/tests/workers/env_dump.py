"""Writes the worker's rank contract to <out>/<RANK>.json."""

import json
import os
import sys
from pathlib import Path

keys = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
]
out = Path(sys.argv[1])
(out / f"{os.environ['RANK']}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
