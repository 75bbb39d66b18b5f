"""Functions for :func:`elastic_runner.launch` in tests/e2e/test_api_agents.py: each runs
in a worker process (importable by reference as ``tests.workers.api_functions``) and
returns what it saw of the worker environment as JSON-friendly values.

``mark_dir`` arguments: the worker writes ``<mark_dir>/<RANK>.<pid>.json`` (its view of
the environment) as soon as it starts, so that a test can wait for workers to run.
"""

from __future__ import annotations

import json
import os
import queue
import time
from pathlib import Path
from typing import Any

#: The worker environment variables the functions report (as ints where they are ints).
KEYS = (
    "RANK",
    "LOCAL_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RESTART_COUNT",
)


def env_view() -> dict[str, Any]:
    """This worker's ranks and sizes (``ROLE_NAME`` a string, the others ints)."""
    view: dict[str, Any] = {}
    for key in KEYS:
        value = os.environ[key]
        view[key] = value if key == "ROLE_NAME" else int(value)
    view["pid"] = os.getpid()
    return view


def _mark(mark_dir: str | None, view: dict[str, Any]) -> None:
    if mark_dir is None:
        return
    _write(Path(mark_dir) / f"{view['RANK']}.{view['pid']}.json", {**view, "t": time.time()})


def _write(path: Path, data: Any) -> None:
    tmp = path.with_name("." + path.name)
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def ranks() -> dict[str, Any]:
    """Rank assignment: the environment, nothing else (25 of these share 2 cores)."""
    return env_view()


def rank() -> int:
    """This worker's RANK."""
    return int(os.environ["RANK"])


def drift(mark_dir: str, seconds: float) -> int:
    """Rank 0 returns at once; the others ``seconds`` after rank 0 returned (whenever
    they started). Each writes when it returned to ``<mark_dir>/done.<RANK>``."""
    rank = int(os.environ["RANK"])
    if rank:
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(mark_dir, "done.0")):
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 did not finish within 60 s")
            time.sleep(0.02)
        time.sleep(seconds)
    _write(Path(mark_dir) / f"done.{rank}", time.time())
    return rank


def held(mark_dir: str, hold_file: str, hold_for: float = 60.0) -> dict[str, Any]:
    """Mark that it runs; then, if ``hold_file`` exists when it starts, sleep
    ``hold_for`` seconds (until the agent stops it); else return at once."""
    view = env_view()
    _mark(mark_dir, view)
    if os.path.exists(hold_file):
        time.sleep(hold_for)
    return view


def odd_fails(mark_dir: str, sleep: float = 20.0) -> int:
    """Odd ranks raise at once (after marking that they run); even ranks sleep ``sleep``
    seconds and return their rank."""
    view = env_view()
    _mark(mark_dir, view)
    rank = int(view["RANK"])
    if rank % 2:
        raise ValueError(f"rank {rank} fails on purpose")
    time.sleep(sleep)
    return rank


def spawned_agent(
    overrides: list[str],
    run_dir: str,
    results: queue.Queue[tuple[str, dict[int, Any], int, str]],
) -> None:
    """A node of a job in a ``multiprocessing`` child: launch, then put
    ``(run_dir, return_values, exit_code, run_id)`` on ``results``."""
    import elastic_runner

    result = elastic_runner.launch(ranks, overrides=overrides, run_dir=run_dir)
    results.put((run_dir, dict(result.return_values), result.exit_code, result.run_id))
