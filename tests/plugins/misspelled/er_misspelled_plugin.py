"""A test plugin with a misspelled hook name (``workers_startd``): pluggy alone would
register it silently and never call it; elastic-run refuses to start, naming the plugin,
the hook and the hook it probably meant. If it were ever called, it writes
``$ER_MISSPELLED_LOG``."""

from __future__ import annotations

import os
from typing import Any

from elastic_runner import hookimpl


@hookimpl
def elastic_runner_workers_startd(context: Any, group: Any) -> None:
    path = os.environ.get("ER_MISSPELLED_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"called for attempt {group.attempt}\n")
