"""The run's live status and the HTTP health endpoint that serves it (``health.port``).

- ``GET /healthz``: 200 while the agent and its workers are healthy (including while it
  waits in a rendezvous), 503 while they are failing, hung or restart-looping (at least
  ``health.restart_loop`` restarts within ``health.restart_window`` seconds). A liveness
  probe.
- ``GET /readyz``: 200 only while the workers run and nothing is wrong. A readiness probe.
- ``GET /status``: JSON with run id, round, group rank, world size and, per worker, state,
  pid, restarts, CPU, RSS and seconds since its last output.

A :class:`RunStatus` follows the run as an event sink (it sees every event the agent
emits); the server's threads only read snapshots of it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from elastic_runner.events import Event, names
from elastic_runner.spec import WorkerActivity, WorkerState, WorkerStatus
from elastic_runner.workers.resources import Usage

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler

__all__ = ["HealthServer", "RunStatus"]

log = logging.getLogger(__name__)


class RunStatus:
    """What the agent is doing now, safe to read from other threads."""

    def __init__(
        self,
        run_id: str,
        node: str,
        *,
        restart_loop: int = 3,
        restart_window: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_id, self.node = run_id, node
        self._restart_loop, self._restart_window = restart_loop, restart_window
        self._clock = clock
        self._lock = threading.Lock()
        self._fields: dict[str, Any] = {
            "state": WorkerState.INIT.value,
            "phase": "starting",
            "round": None,
            "group_rank": None,
            "group_world_size": None,
            "world_size": None,
            "attempt": 0,
            "restart_count": 0,
        }
        self._problem: str | None = None
        self._workers: dict[int, dict[str, Any]] = {}
        self._restarts: deque[float] = deque()
        self._activity: Callable[[], Mapping[int, WorkerActivity]] = dict
        self._usage: Callable[[], Mapping[int, Usage]] = dict

    # -- written by the agent's thread, as an event sink ---------------------------------

    def emit(self, event: Event) -> None:
        """Follow the run through the agent's events (an event sink): the status knows
        only what the events say, so it never reaches into the agent's loop."""
        m, name = event.metadata, event.name
        with self._lock:
            f = self._fields
            f["attempt"] = m.get("attempt", f["attempt"])
            f["restart_count"] = m.get("restart_count", f["restart_count"])
            if event.source == "AGENT" and event.state:
                f["state"] = event.state
            if name == names.RENDEZVOUS_JOIN:
                f["phase"] = "rendezvous"
            elif name == names.RENDEZVOUS_COMPLETE:
                f.update(
                    round=m.get("round"),
                    group_rank=m.get("group_rank"),
                    group_world_size=m.get("group_world_size"),
                )
            elif name == names.RANKS_ASSIGNED:
                f["world_size"] = m.get("world_size")
                self._workers = {}
            elif event.source == "WORKER":
                self._worker_event(event)
            elif name == names.EXIT_BARRIER:
                f["phase"] = "waiting for the other nodes to finish"
            elif name == names.FENCED:
                self._problem = "lost contact with the rendezvous store: workers fenced"
            elif name == names.RESTART:
                f["phase"] = "restarting"
                if m.get("reason") == "failure":
                    self._restarts.append(self._clock())
            elif name in (names.WATCHDOG_FIRED, names.TIMER_EXPIRED):
                self._problem = f"rank {m.get('rank')}: {m.get('detail')}"
            elif name == names.NODE_OUT:  # alive and waiting: healthy, not ready
                f["phase"] = (
                    f"out: health check {m.get('plugin')!r} failed: {m.get('reason')}; "
                    f"checking again in {m.get('retry_in')} s"
                )
            elif name == names.NODE_IN:
                f["phase"] = "rendezvous"
            elif name == names.HEALTH_CHECK_REFUSED:
                self._problem = f"health check of {m.get('plugin')!r} refused: {m.get('reason')}"
            elif name in (names.status(WorkerState.SUCCEEDED), names.status(WorkerState.FAILED)):
                f["phase"] = "finished"
                if event.state == WorkerState.SUCCEEDED:
                    self._problem = None
                elif m.get("reason"):
                    self._problem = self._problem or str(m["reason"])

    def _worker_event(self, event: Event) -> None:
        m, local_rank = event.metadata, int(event.metadata.get("local_rank", -1))
        if event.state == WorkerStatus.START:
            self._workers[local_rank] = {
                "rank": event.rank,
                "pid": m.get("pid"),
                "state": WorkerState.HEALTHY.value,
            }
            self._fields.update(phase="running", state=WorkerState.HEALTHY.value)
            self._problem = None  # a new attempt runs
            return
        self._workers.setdefault(local_rank, {"rank": event.rank}).update(
            state=event.state, pid=None, exit_code=m.get("exit_code")
        )
        if event.state == WorkerStatus.FAILED and self._problem is None:
            how = m.get("signal") or f"exit code {m.get('exit_code')}"
            error = f": {m['error']}" if m.get("error") else ""
            self._problem = f"worker rank {event.rank} failed ({how}){error}"

    def close(self) -> None:
        """Nothing to release (an event sink)."""

    def watch(
        self,
        activity: Callable[[], Mapping[int, WorkerActivity]],
        usage: Callable[[], Mapping[int, Usage]],
    ) -> None:
        """Where live per-worker figures come from (read at each request)."""
        self._activity, self._usage = activity, usage

    # -- read by the endpoint -----------------------------------------------------------

    def _recent_restarts(self, now: float) -> int:
        while self._restarts and self._restarts[0] < now - self._restart_window:
            self._restarts.popleft()
        return len(self._restarts)

    def health(self) -> tuple[bool, str]:
        """(healthy, why): the answer of ``/healthz``."""
        with self._lock:
            recent = self._recent_restarts(self._clock())
            if self._problem:
                return False, self._problem
            if self._fields["state"] in (WorkerState.FAILED, WorkerState.UNHEALTHY):
                return False, f"worker group {self._fields['state']}"
            if recent >= self._restart_loop:
                return False, (
                    f"restart-looping: {recent} restarts in the last "
                    f"{self._restart_window:g} s (health.restart_loop={self._restart_loop})"
                )
            return True, str(self._fields["phase"])

    def ready(self) -> tuple[bool, str]:
        healthy, why = self.health()
        with self._lock:
            running = self._fields["state"] == WorkerState.HEALTHY
        if healthy and not running:
            return False, why
        return healthy, why

    def snapshot(self) -> dict[str, Any]:
        """The JSON of ``/status``."""
        now = self._clock()
        activity, usage = self._activity(), self._usage()
        healthy, why = self.health()
        with self._lock:
            workers = []
            for local_rank, w in sorted(self._workers.items()):
                a, u = activity.get(local_rank), usage.get(local_rank)
                workers.append(
                    {
                        "local_rank": local_rank,
                        **w,
                        "restarts": self._fields["restart_count"],
                        "cpu_percent": round(u.cpu_percent, 1) if u else None,
                        "rss_bytes": u.rss if u else None,
                        "seconds_since_output": round(now - a.last_output, 3) if a else None,
                    }
                )
            return {
                "run_id": self.run_id,
                "node": self.node,
                **self._fields,
                "healthy": healthy,
                "reason": why,
                "restarts_in_window": len(self._restarts),
                "workers": workers,
            }


class HealthServer:
    """Serves a :class:`RunStatus` over HTTP from a daemon thread; ``port=0`` picks one."""

    def __init__(self, status: RunStatus, host: str = "127.0.0.1", port: int = 0) -> None:
        from http.server import ThreadingHTTPServer  # only when an endpoint is asked for

        self.status = status
        self._server = ThreadingHTTPServer((host, port), _handler(status))
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-server", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(status: RunStatus) -> type[BaseHTTPRequestHandler]:
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/healthz", "/readyz"):
                ok, why = status.health() if path == "/healthz" else status.ready()
                text = f"{'ok' if ok else 'unhealthy'}: {why}\n"
                self._send(200 if ok else 503, "text/plain", text)
            elif path == "/status":
                self._send(200, "application/json", json.dumps(status.snapshot(), indent=1) + "\n")
            else:
                self._send(404, "text/plain", "try /healthz, /readyz or /status\n")

        def _send(self, code: int, kind: str, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("health: " + format, *args)

    return Handler
