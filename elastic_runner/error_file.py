"""torch's error-file format, written and read in one place.

A worker's uncaught exception goes to ``$TORCHELASTIC_ERROR_FILE`` so the agent (ours or
torch's) reports the real error and traceback instead of an exit code::

    from elastic_runner import record

    @record
    def main():
        ...

torch's own ``torch.distributed.elastic.multiprocessing.errors.record`` writes the same
format and works unchanged; elastic-run writes it too, for an agent above it, when it runs
under one. This module imports nothing heavy: workers load it.
"""

from __future__ import annotations

import functools
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import NamedTuple, ParamSpec, TypeVar

__all__ = ["ErrorRecord", "read_error_file", "record", "write_error", "write_error_file"]

P = ParamSpec("P")
R = TypeVar("R")


class ErrorRecord(NamedTuple):
    """What an error file says: the message (``ValueError: bad batch``), the Python
    traceback, and when it was written (wall-clock seconds; ``None`` when not given)."""

    message: str | None
    traceback: str | None
    timestamp: float | None


def write_error(
    path: str | os.PathLike[str],
    message: str,
    traceback_text: str,
    timestamp: float,
    error_code: int | None = None,
) -> None:
    """Write one error in torch's format, atomically. ``timestamp`` is torch's whole
    seconds; ``timestamp_precise`` adds the fraction so the agent can order failures within
    a second; ``errorCode`` is set when a launcher passes a child's error up."""
    data: dict[str, object] = {
        "message": {
            "message": message,
            "extraInfo": {
                "py_callstack": traceback_text,
                "timestamp": str(int(timestamp)),
                "timestamp_precise": repr(timestamp),
            },
        }
    }
    if error_code is not None:
        data["errorCode"] = error_code
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def write_error_file(exc: BaseException, path: str | None = None) -> None:
    """Write ``exc`` to ``path`` (default: ``$TORCHELASTIC_ERROR_FILE``; nothing when
    unset)."""
    path = path or os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    write_error(
        path,
        f"{type(exc).__name__}: {exc}",
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        time.time(),
    )


def read_error_file(path: str | os.PathLike[str]) -> ErrorRecord | None:
    """The error an error file holds (written by :func:`write_error`, torch's ``@record``,
    or a plain string message, which torch also accepts); ``None`` when there is none or it
    cannot be read as one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        body = data["message"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(body, str):
        return ErrorRecord(body, None, None)
    extra = body.get("extraInfo", {}) if isinstance(body, dict) else {}
    timestamp = None
    for key in ("timestamp_precise", "timestamp"):
        try:
            timestamp = float(extra[key])
            break
        except (KeyError, TypeError, ValueError):
            continue
    return ErrorRecord(body.get("message"), extra.get("py_callstack"), timestamp)


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
