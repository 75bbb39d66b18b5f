"""A Python callable as a worker: ``python -m elastic_runner.workers.call PAYLOAD``.

:func:`elastic_runner.launch` writes the function, its arguments and the caller's
``sys.path`` to ``PAYLOAD`` (:func:`write_payload`); each worker process (spawned, not
forked: an ordinary worker started by the supervisor, with the whole worker environment)
loads it, calls the function, and writes what it returned beside its error file
(:func:`return_path`), where the caller reads it back (:func:`read_return`). An exception
the function raises is written to the error file as ``@record`` does, and the worker
exits 1 with the traceback on stderr.

cloudpickle sends functions by value when they cannot be imported by name in the worker
(a function of ``__main__``, a notebook cell, a lambda, a closure) and by reference
otherwise; the caller's ``sys.path`` comes first so that by-reference modules import in the
worker as they did in the caller (multiprocessing's spawn does the same).
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RETURN_FILE",
    "UnsendableError",
    "main",
    "read_return",
    "return_path",
    "write_payload",
]

#: Each worker's return value, beside its error file (``TORCHELASTIC_ERROR_FILE``).
RETURN_FILE = "return.pkl"


class UnsendableError(TypeError):
    """A function, its arguments or a return value that cannot be pickled."""


def write_payload(
    path: Path,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> None:
    """Write what each worker calls, readable by its owner only. Raises
    :class:`UnsendableError` (one line naming the function) when it cannot be pickled."""
    import cloudpickle

    # A process multiprocessing started runs the main script as __mp_main__, which the
    # workers cannot import: its functions travel by value, like __main__'s.
    main = sys.modules.get("__mp_main__")
    by_value = main is not None and getattr(main, "__name__", None) == "__mp_main__"
    if by_value:
        cloudpickle.register_pickle_by_value(main)
    try:
        call = cloudpickle.dumps((fn, tuple(args), dict(kwargs)))
    except Exception as exc:  # pickling can raise anything (a lock, a socket, a generator)
        raise UnsendableError(
            f"cannot send {_name(fn)} with its arguments to the workers: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(main)
    data = pickle.dumps({"sys_path": list(sys.path), "call": call})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def return_path(error_file: str | os.PathLike[str]) -> Path:
    """Where the worker whose error file is ``error_file`` writes its return value."""
    return Path(error_file).with_name(RETURN_FILE)


def read_return(path: Path) -> Any:
    """The value a worker returned (``None`` when it wrote none: it ended by
    ``sys.exit(0)``)."""
    import cloudpickle

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return cloudpickle.loads(data)


def main(argv: Sequence[str]) -> None:
    from elastic_runner.error_file import write_error_file

    if len(argv) != 1:
        sys.exit("usage: python -m elastic_runner.workers.call PAYLOAD")
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    try:
        fn, args, kwargs = _load(Path(argv[0]))
    except Exception as exc:
        failed = RuntimeError(
            f"cannot load the function in the worker: {type(exc).__name__}: {_first_line(exc)}"
        )
        write_error_file(failed.with_traceback(exc.__traceback__))
        raise failed from exc
    try:
        value = fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:
        # The traceback from the function's own frame: this module's is noise.
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is not None:
            exc = exc.with_traceback(exc.__traceback__.tb_next)
        write_error_file(exc)
        traceback.print_exception(exc)
        sys.exit(1)
    if error_file is None:  # not started by an agent: nowhere to send it
        return
    _send(value, return_path(error_file))


def _load(path: Path) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    with open(path, "rb") as f:
        payload = pickle.load(f)
    # The caller's path first, as multiprocessing's spawn does; ours stays after it.
    sys.path[:0] = [p for p in payload["sys_path"] if p not in sys.path]
    import cloudpickle

    loaded = cloudpickle.loads(payload["call"])
    return loaded  # type: ignore[no-any-return]


def _send(value: Any, path: Path) -> None:
    """Write ``value`` whole or not at all; one that cannot be pickled is this worker's
    error (recorded, exit 1), named with its type."""
    import cloudpickle

    from elastic_runner.error_file import write_error_file

    try:
        data = cloudpickle.dumps(value)
    except Exception as exc:
        failed = UnsendableError(
            f"the return value of rank {os.environ.get('RANK', '?')} "
            f"({type(value).__name__}) cannot be sent back to the caller: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        )
        write_error_file(failed)
        raise failed from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    main(sys.argv[1:])
