"""Built-in node health checks, run before this node joins each rendezvous round.

Each check is a plugin implementing ``elastic_runner_before_rendezvous`` (the hook a
third-party check implements too, :mod:`elastic_runner.hookspecs`), registered for the
run from the ``checks`` config (validated into these objects by
:func:`elastic_runner.config.validate`)::

    elastic-run +job=resnet '+checks.disk={/data: 50GiB}' checks.gpus=8 \\
        checks.memory=16GiB checks.command='nvidia-smi -q' checks.retry_for=1800

A failing check keeps the node out with one line naming the check and the reason. With
``checks.retry_for`` the node waits, checking again every ``checks.retry_interval``
seconds, and joins the job once every check passes (the job runs on without it meanwhile
when ``nnodes`` allows); without it, the node leaves the job and exits 1.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field

from elastic_runner.hookspecs import hookimpl
from elastic_runner.spec import RunContext
from elastic_runner.workers.resources import format_bytes

__all__ = [
    "ChecksConfig",
    "CommandCheck",
    "DiskCheck",
    "GpuCheck",
    "MemoryCheck",
    "NodeCheck",
    "plugin_name",
]


@dataclass
class ChecksConfig:
    """Node health checks before each rendezvous round (none by default)."""

    #: Path -> the free space it must have (``'+checks.disk={/data: 50GiB, /tmp: 1GiB}'``).
    disk: dict[str, str] = field(default_factory=dict)
    #: Accelerators (GPUs) this node must see, counted without torch (0: no check).
    gpus: int = 0
    #: Memory that must be available (``16GiB``; null: no check).
    memory: str | None = None
    #: A shell command that must exit 0 (null: none), and how long it may take.
    command: str | None = None
    command_timeout: float = 60.0
    #: How long a node its checks keep out goes on checking before it leaves the job
    #: (0: it leaves at once and exits 1).
    retry_for: float = 0.0
    #: Seconds between two checks of a node that is out.
    retry_interval: float = 10.0


@dataclass(frozen=True)
class DiskCheck:
    """``path`` has at least ``free`` bytes free."""

    path: str
    free: int
    name = "disk"

    @hookimpl
    def elastic_runner_before_rendezvous(self, context: RunContext) -> str | None:
        try:
            have = shutil.disk_usage(self.path).free
        except OSError as exc:
            return f"{self.path}: {exc.strerror or exc}"
        if have < self.free:
            return f"{self.path}: {format_bytes(have)} free, {format_bytes(self.free)} needed"
        return None


@dataclass(frozen=True)
class GpuCheck:
    """At least ``count`` accelerators visible to this node's workers."""

    count: int
    name = "gpus"

    @hookimpl
    def elastic_runner_before_rendezvous(self, context: RunContext) -> str | None:
        from elastic_runner.accelerators import detect_gpus

        found = detect_gpus()
        if found.visible < self.count:
            return f"{self.count} GPUs needed; {found.describe()}"
        return None


@dataclass(frozen=True)
class MemoryCheck:
    """At least ``available`` bytes of memory available (``MemAvailable``)."""

    available: int
    name = "memory"

    @hookimpl
    def elastic_runner_before_rendezvous(self, context: RunContext) -> str | None:
        import psutil

        have = psutil.virtual_memory().available
        if have < self.available:
            return f"{format_bytes(have)} available, {format_bytes(self.available)} needed"
        return None


@dataclass(frozen=True)
class CommandCheck:
    """``command`` (a shell line) exits 0 within ``timeout`` seconds; its own last line of
    output says why when it does not."""

    command: str
    timeout: float
    name = "command"

    @hookimpl
    def elastic_runner_before_rendezvous(self, context: RunContext) -> str | None:
        try:
            done = subprocess.run(
                ["/bin/sh", "-c", self.command],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.timeout,
                cwd=context.run_dir,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return f"{self.command!r} did not finish in {self.timeout:g} s"
        except OSError as exc:
            return f"{self.command!r}: {exc.strerror or exc}"
        if done.returncode == 0:
            return None
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        why = f": {said[-1][:200]}" if said else ""
        return f"{self.command!r} exited {done.returncode}{why}"


#: Any of the built-in checks (each has a ``name`` and the hook).
NodeCheck = DiskCheck | GpuCheck | MemoryCheck | CommandCheck


def plugin_name(check: NodeCheck) -> str:
    """The name a check is registered under, which a refusal names: ``check:gpus``,
    ``check:disk:/data``."""
    return f"check:disk:{check.path}" if isinstance(check, DiskCheck) else f"check:{check.name}"
