"""One line for people who type a torchrun command line where elastic-run's Hydra form is
expected (``elastic-run train.py``, ``elastic-run --nproc-per-node=2 train.py``): it
shows the command that works."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

__all__ = ["misuse_hint"]

#: Hydra's own flags; ``-m`` (multirun) and ``-r`` (run) are Hydra's, not torchrun's.
_HYDRA_FLAGS = frozenset(
    {
        "-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "--resolve", "-p",
        "--package", "-r", "--run", "-m", "--multirun", "-cp", "--config-path", "-cn",
        "--config-name", "-cd", "--config-dir", "-i", "--info", "-sc",
        "--shell-completion", "--experimental-rerun",
    }
)  # fmt: skip


def misuse_hint(argv: Sequence[str]) -> str | None:
    """The one-line error for a torchrun-style command line given to the Hydra form, or
    ``None`` when ``argv`` does not look like one."""
    working = shlex.join(["elastic-run", "torchrun", *argv])
    for arg in argv:
        name = arg.partition("=")[0]
        if name in _HYDRA_FLAGS:
            continue
        if arg.startswith("-"):  # every torchrun option does
            # lazy: the option table costs ~5 ms to import, and a Hydra-form command line
            # (key=value ...) never needs it
            from elastic_runner.torchrun.options import OPTION_STRINGS

            if name in OPTION_STRINGS:
                return (
                    f"{name} is a torchrun option; to run a torchrun command line, put "
                    f"'torchrun' before it: {working}"
                )
            continue
        if "=" in arg or arg.startswith(("+", "~")):
            continue
        if arg.endswith(".py") or Path(arg).is_file():
            hydra_form = shlex.join(["elastic-run", f"job.entrypoint={arg}"])
            return (
                f"{arg!r} is not a config override (key=value); to run a script: {working} "
                f"(or {hydra_form} with job.args=[...])"
            )
        return None
    return None
