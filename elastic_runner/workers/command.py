"""Turning ``job.entrypoint`` / ``job.module`` into a worker's argv (torchrun's rules)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from elastic_runner.errors import ConfigError

__all__ = ["resolve_command"]


def resolve_command(
    entrypoint: str | None,
    module: str | None,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """``x.py`` -> ``python -u /abs/x.py args``; a module -> ``python -u -m module args``;
    anything else -> the executable found on PATH. The interpreter is ``PYTHON_EXEC`` when
    set (as in torchrun), else the agent's own."""
    env = os.environ if env is None else env
    python = env.get("PYTHON_EXEC") or sys.executable
    if module:
        return (python, "-u", "-m", module, *args)
    if not entrypoint:
        raise ConfigError("job.entrypoint", entrypoint, "required")
    if entrypoint.endswith(".py"):
        path = Path(entrypoint).expanduser()
        if not path.is_file():
            raise ConfigError(
                "job.entrypoint", entrypoint, f"no such file (relative to {os.getcwd()})"
            )
        return (python, "-u", str(path.resolve()), *args)
    exe = shutil.which(entrypoint, path=env.get("PATH"))
    if exe is None:
        raise ConfigError(
            "job.entrypoint", entrypoint, "not a .py file and no executable of that name on PATH"
        )
    return (exe, *args)
