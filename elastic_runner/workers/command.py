"""Turning ``job.entrypoint`` / ``job.module`` into a worker's argv (torchrun's rules)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from elastic_runner.errors import ConfigError

__all__ = ["NO_PYTHON_WITH_MODULE", "resolve_command"]


#: The error of ``job.module`` with ``job.python=false`` (torchrun: "Don't use both the
#: '--no-python' flag and the '--module' flag at the same time.").
NO_PYTHON_WITH_MODULE = (
    "not with job.module (a module always runs with python; false runs job.entrypoint "
    "as a program, like torchrun's --no-python)"
)


def resolve_command(
    entrypoint: str | None,
    module: str | None,
    args: Sequence[str],
    *,
    python: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """A module -> ``python -u -m module args``. Else ``python`` (``job.python``) says how
    the entrypoint runs: ``True`` -> ``python -u /abs/path args`` whatever the file's name
    (torchrun's default); ``False`` -> the entrypoint is the program (torchrun's
    ``--no-python``): a path with a ``/`` is used as it is, a bare name is looked up on
    PATH; ``None`` -> ``True`` for a ``.py`` file, ``False`` for anything else. The
    interpreter is ``PYTHON_EXEC`` when set (as in torchrun), else the agent's own."""
    env = os.environ if env is None else env
    interpreter = env.get("PYTHON_EXEC") or sys.executable
    if module:
        if python is False:  # torchrun refuses --no-python with --module as well
            raise ConfigError("job.python", "false", NO_PYTHON_WITH_MODULE)
        return (interpreter, "-u", "-m", module, *args)
    if not entrypoint:
        raise ConfigError("job.entrypoint", entrypoint, "required")
    if python is None:
        python = entrypoint.endswith(".py")
        if not python:
            exe = shutil.which(entrypoint, path=env.get("PATH"))
            if exe is None:
                raise ConfigError(
                    "job.entrypoint",
                    entrypoint,
                    "not a .py file and no executable of that name on PATH",
                )
            return (exe, *args)
    if python:
        path = Path(entrypoint).expanduser()
        if not path.is_file():
            raise ConfigError(
                "job.entrypoint", entrypoint, f"no such file (relative to {os.getcwd()})"
            )
        return (interpreter, "-u", str(path.resolve()), *args)
    return (_executable(entrypoint, env), *args)


def _executable(entrypoint: str, env: Mapping[str, str]) -> str:
    """``job.python=false``: the program to exec, as ``execvp`` would find it (a name
    with a ``/`` is a path, relative to the current directory; any other name is looked
    up on PATH only), made absolute so the worker's argv[0] does not depend on how it
    is exec'd; an error names what is missing."""
    if "/" in entrypoint or entrypoint.startswith("~"):
        path = os.path.expanduser(entrypoint)
        if not os.path.exists(path):
            raise ConfigError(
                "job.entrypoint", entrypoint, f"no such file (relative to {os.getcwd()})"
            )
        # shutil.which checks a path with a directory as it is (executable, not a dir)
        if shutil.which(path) is None:
            raise ConfigError(
                "job.entrypoint",
                entrypoint,
                "not an executable file (job.python=false runs it as a program: chmod +x "
                "it, or job.python=true to run it with python)",
            )
        return os.path.abspath(path)  # not resolved: a symlink's name is its argv[0]
    exe = shutil.which(entrypoint, path=env.get("PATH"))
    if exe is None:
        here = Path(entrypoint)
        hint = f"; ./{entrypoint} for the file in {os.getcwd()}" if here.is_file() else ""
        raise ConfigError(
            "job.entrypoint",
            entrypoint,
            f"no executable of that name on PATH (job.python=false runs it as a program{hint})",
        )
    return exe
