"""``@elastic_runner.record``: write a worker's uncaught exception to its error file.

The file is ``$TORCHELASTIC_ERROR_FILE`` in torch's format, so the agent (ours or
torch's) reports the real error and traceback instead of an exit code::

    from elastic_runner import record

    @record
    def main():
        ...

torch's own ``torch.distributed.elastic.multiprocessing.errors.record`` writes the same
format and works unchanged. This module imports nothing heavy: workers load it.
"""

from __future__ import annotations

import functools
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["record", "write_error_file"]

P = ParamSpec("P")
R = TypeVar("R")


def write_error_file(exc: BaseException, path: str | None = None) -> None:
    """Write ``exc`` to ``path`` (default: ``$TORCHELASTIC_ERROR_FILE``; nothing when
    unset). ``timestamp`` is torch's whole seconds; ``timestamp_precise`` adds the
    fraction so the agent can order failures within a second."""
    path = path or os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "".join(
                    traceback.format_exception(type(exc), exc, exc.__traceback__)
                ),
                "timestamp": str(int(now)),
                "timestamp_precise": repr(now),
            },
        }
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def record(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a worker's main: an uncaught exception is written to the error file and
    re-raised (so the worker still exits non-zero with its traceback on stderr)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as exc:
            write_error_file(exc)
            raise

    return wrapper
