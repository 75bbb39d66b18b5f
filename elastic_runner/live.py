"""The live status display on a terminal (rich): a compact table of the workers (rank,
state, pid, restarts, CPU, RSS, seconds since last output) under the scrolling worker
output, and a progress line while the node waits in a rendezvous ("waiting for 2 more
node(s) (1 of 3), 41 s left"). Not on a terminal, nothing changes: plain log lines.

Worker output and elastic-run's own log lines go through the display's console while it
runs, so they scroll above the table instead of tearing it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from elastic_runner.health import RunStatus
from elastic_runner.spec import WorkerState, WorkerStatus
from elastic_runner.workers.resources import format_bytes

__all__ = ["LiveView"]

#: Styles of group states and worker end states (both str enums: they match the strings in
#: the status snapshot).
_STATE_STYLE: dict[str, str] = {
    WorkerState.HEALTHY: "green",
    WorkerState.SUCCEEDED: "green",
    WorkerState.FAILED: "bold red",
    WorkerStatus.TERMINATED: "yellow",
    WorkerState.STOPPED: "yellow",
    WorkerState.INIT: "cyan",
}


class _ConsoleStream:
    """A text stream for logging handlers that prints through the live console."""

    def __init__(self, console: Console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        if text.strip():
            self._console.print(Text(text.rstrip("\n")), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


class LiveView:
    """Renders a :class:`RunStatus` at ``refresh`` Hz until :meth:`stop`."""

    def __init__(
        self,
        status: RunStatus,
        waiting: Callable[[], str | None] = lambda: None,
        file: IO[str] | None = None,
        refresh: float = 2.0,
    ) -> None:
        self.status = status
        self._waiting = waiting
        self.console = Console(file=file or sys.stderr, highlight=False)
        self._live = Live(
            console=self.console,
            get_renderable=self.render,
            refresh_per_second=refresh,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def sink(self, stream: int, data: bytes) -> None:
        """Worker output (whole lines) from the supervisor's console."""
        self.console.print(
            Text(data.decode(errors="replace").rstrip("\n")), soft_wrap=True, markup=False
        )

    def start(self) -> None:
        self._live.start()
        proxy = _ConsoleStream(self.console)
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream in (
                sys.stderr,
                sys.__stderr__,
            ):
                self._handlers.append((handler, handler.setStream(proxy)))

    def stop(self) -> None:
        for handler, stream in self._handlers:
            handler.setStream(stream)
        self._handlers.clear()
        self._live.stop()

    def render(self) -> RenderableType:
        snap = self.status.snapshot()
        head = Text()
        head.append(f"run {snap['run_id']}", style="bold")
        if snap["round"] is not None:
            head.append(
                f"  round {snap['round']}  node {snap['group_rank']}/{snap['group_world_size']}"
                f"  world {snap['world_size']}"
            )
        head.append(f"  restarts {snap['restart_count']}  ")
        head.append(snap["state"], style=_STATE_STYLE.get(snap["state"], ""))
        if not snap["healthy"]:
            head.append(f"  {snap['reason']}", style="bold red")
        parts: list[RenderableType] = [head]
        waiting = self._waiting() if snap["phase"] == "rendezvous" else None
        if snap["phase"] == "rendezvous":
            parts.append(Text(f"rendezvous: {waiting or 'joining'}", style="cyan"))
        if snap["workers"]:
            parts.append(_worker_table(snap["workers"]))
        return Group(*parts)


def _worker_table(workers: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for name, justify in (
        ("rank", "right"),
        ("state", "left"),
        ("pid", "right"),
        ("restarts", "right"),
        ("CPU %", "right"),
        ("RSS", "right"),
        ("quiet s", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for w in workers:
        state = str(w.get("state", "?"))
        cpu, rss, quiet = w.get("cpu_percent"), w.get("rss_bytes"), w.get("seconds_since_output")
        table.add_row(
            str(w.get("rank", "?")),
            Text(state, style=_STATE_STYLE.get(state, "")),
            str(w.get("pid") or "-"),
            str(w.get("restarts", 0)),
            "-" if cpu is None else f"{cpu:.0f}",
            "-" if rss is None else format_bytes(rss),
            "-" if quiet is None else f"{quiet:.0f}",
        )
    return table
