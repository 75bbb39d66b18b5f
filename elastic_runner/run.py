"""The assembly step: from a validated run configuration to a finished
:class:`~elastic_runner.spec.RunResult`, with nothing leaked.

Every front door ends here: ``elastic-run``'s Hydra shell (:mod:`elastic_runner.cli`)
composes and validates, then calls :func:`run`. Each component of the run (timer server,
event sink, metric handler, health endpoint, rendezvous, worker supervisor, guardian, live
view, signal handlers) is built inside one :class:`~contextlib.ExitStack` and closed in
reverse order whatever fails, so a build that fails half-way (a busy port, a bad timer
path, a rendezvous that cannot start) leaves no thread, socket, FIFO or process behind,
and the next point of a sweep finds its ports free.

Components are built in the order that lets a configuration error surface before anything
reaches the network: the rendezvous (which may host a store and contacts the others) comes
last, right before the agent loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elastic_runner.agent import ElasticAgent
from elastic_runner.checks import plugin_name
from elastic_runner.config import HANDLED_SIGNALS, LogsConfig, ValidConfig, parse_signals
from elastic_runner.crash_loop import CrashLoopJudge, is_verdict
from elastic_runner.errors import ConfigError
from elastic_runner.events import FanOutSink
from elastic_runner.exclusion import ExclusionJudge
from elastic_runner.faults import FailCheck, FailCheckFault, FaultInjector
from elastic_runner.health import HealthServer, RunStatus
from elastic_runner.lifecycle import Lifecycle
from elastic_runner.plugins import LoadedPlugins
from elastic_runner.preemption import requeue, resumed
from elastic_runner.registry import ComponentKind, Registry
from elastic_runner.rendezvous.api import RendezvousError, RendezvousHandler
from elastic_runner.rendezvous.tcp import TOKEN_ENV
from elastic_runner.report import format_report, write_nested_error_file
from elastic_runner.signals import LateStops, handle_signals
from elastic_runner.spec import RunContext, RunResult, WorkerExit, WorkerSpec, WorkerState
from elastic_runner.timer.api import TimerServer
from elastic_runner.timer.server import FileTimerServer, worker_trees
from elastic_runner.workers.cgroup import contain
from elastic_runner.workers.command import resolve_command
from elastic_runner.workers.guardian import Guardian
from elastic_runner.workers.logs import (
    CollapsingConsole,
    Console,
    WorkerLogPaths,
    describe_os_error,
)
from elastic_runner.workers.resources import ResourceMonitor
from elastic_runner.workers.supervisor import ProcessSupervisor

if TYPE_CHECKING:
    from elastic_runner.live import LiveView
    from elastic_runner.watchdog import HangDetector

__all__ = ["CONFIG_FILE", "run"]

log = logging.getLogger("elastic_runner")

#: The resolved configuration, in the run directory (with the run id filled in).
CONFIG_FILE = "config.yaml"


def run(
    valid: ValidConfig,
    plugins: LoadedPlugins,
    *,
    run_dir: Path,
    base_env: Mapping[str, str],
    shared_terminal: bool = False,
    late_stops: LateStops | None = None,
) -> RunResult:
    """Run the job on this node until it succeeds, fails for good or is stopped, then
    print its report on stderr and call the ``run_end`` hooks.

    ``base_env`` is the environment workers inherit; ``shared_terminal`` says other runs
    print to the same terminal (points of a parallel sweep): no live table then;
    ``late_stops`` takes the stop signals over when the run's loop ends. A bad
    value found while building raises :class:`~elastic_runner.errors.ConfigError` after
    everything built so far is closed; a rendezvous that cannot complete ends the run as
    failed (``ended_because`` says why)."""
    conf = valid.config
    job = conf.job
    command = resolve_command(job.entrypoint, job.module, job.args, python=job.python, env=base_env)
    run_id = conf.rdzv.id or uuid.uuid4().hex
    context = RunContext(run_id, run_dir, socket.gethostname(), valid.min_nodes, valid.max_nodes)
    with _checks_registered(plugins, valid):
        return _run(valid, plugins, context, base_env, command, shared_terminal, late_stops)


@contextlib.contextmanager
def _checks_registered(plugins: LoadedPlugins, valid: ValidConfig) -> Iterator[None]:
    """The built-in node checks ``checks.*`` asks for (and ``fault=fail_check``'s), as
    plugins of this run only."""
    checks: list[tuple[object, str]] = [(check, plugin_name(check)) for check in valid.checks]
    if isinstance(valid.fault, FailCheckFault):
        checks.append((FailCheck(valid.fault), "fault:fail_check"))
    names = [plugins.pm.register(check, name=name) for check, name in checks]
    try:
        yield
    finally:
        for name in names:
            if name is not None:
                plugins.pm.unregister(name=name)


def _run(
    valid: ValidConfig,
    plugins: LoadedPlugins,
    context: RunContext,
    base_env: Mapping[str, str],
    command: tuple[str, ...],
    shared_terminal: bool,
    late_stops: LateStops | None,
) -> RunResult:
    conf, run_id, run_dir = valid.config, context.run_id, context.run_dir
    lifecycle = Lifecycle(plugins.pm, context)
    assembly = _Assembly(
        valid, plugins.registry, context, lifecycle, base_env, shared_terminal, late_stops
    )
    try:
        with contextlib.ExitStack() as stack:
            spec, result = assembly.run(stack, command)
    except RendezvousError as exc:  # from the backend's factory, or a round that failed
        result = _rendezvous_failed(exc, context, assembly.agent)
        lifecycle.run_end(result)
        return result
    # Everything is closed (workers reaped, ports released): now the report.
    result.run_id, result.run_dir = run_id, run_dir

    def stderr_of(exit_: WorkerExit) -> Path:
        return WorkerLogPaths.of(run_dir, result.attempts, exit_.local_rank).stderr

    print(format_report(result, spec, run_dir, stderr_of), file=sys.stderr, flush=True)
    if result.preempted and conf.signals.requeue:
        requeue(base_env, assembly.agent.group.group_rank if assembly.agent else -1)
    lifecycle.run_end(result)
    if result.is_failed() and (nested := base_env.get("TORCHELASTIC_ERROR_FILE")):
        write_nested_error_file(result, nested)
    return result


@dataclasses.dataclass
class _Assembly:
    """Builds one run's components on an ExitStack, then runs the agent loop."""

    valid: ValidConfig
    registry: Registry
    context: RunContext
    lifecycle: Lifecycle
    base_env: Mapping[str, str]
    shared_terminal: bool
    #: Takes the stop signals over when the loop ends (the report and result follow).
    late_stops: LateStops | None = None
    #: Set once the agent exists (a failed rendezvous reports its attempts).
    agent: ElasticAgent | None = None

    def run(
        self, stack: contextlib.ExitStack, command: tuple[str, ...]
    ) -> tuple[WorkerSpec, RunResult]:
        conf, context = self.valid.config, self.context
        timer: TimerServer = self._component(stack, ComponentKind.TIMER, conf.timer, "stop")
        events = self._component(stack, ComponentKind.EVENTS, conf.events, "close")
        metrics = self._component(stack, ComponentKind.METRICS, conf.metrics, "close")
        health = conf.health
        status = RunStatus(
            context.run_id,
            context.node,
            restart_loop=health.restart_loop,
            restart_window=health.restart_window,
        )
        if health.port:
            stack.callback(_health_server(status, health.host, health.port).close)
        spec = WorkerSpec(
            role=conf.job.role,
            local_world_size=self.valid.nproc_per_node,
            command=command,
            env={**conf.job.env, **timer.worker_env()},
            max_restarts=conf.max_restarts,
            stop_timeout=conf.stop_timeout,
        )
        try:  # a record for the user, not needed by the run: a disk fault is a warning
            _write_config(context.run_dir / CONFIG_FILE, conf, context.run_id)
        except OSError as exc:
            log.warning(
                "cannot write %s: %s; the run goes on without it",
                context.run_dir / CONFIG_FILE,
                describe_os_error(exc),
            )
            with contextlib.suppress(OSError):  # no torn copy
                (context.run_dir / CONFIG_FILE).unlink()
        # Last: it may host a store and reach the other nodes. The agent leaves the job
        # when its loop ends; the shutdown here covers a failure before that.
        rdzv: RendezvousHandler = self._component(
            stack, ComponentKind.RENDEZVOUS, conf.rdzv, "shutdown"
        )
        view = self._live_view(status, rdzv)
        supervisor = _supervisor(
            conf.logs, view, self.valid.memory_limit, self.valid.console_streams
        )
        stack.callback(supervisor.close)
        log.info(
            "run %s: %d worker(s) of %s; run directory: %s",
            context.run_id,
            spec.local_world_size,
            " ".join(command),
            context.run_dir,
        )
        # Sweeps the workers if this agent dies, fences them if it stops renewing its lease.
        # It removes the timer's FIFO too if this agent is killed.
        remove = getattr(timer, "owned_paths", ())
        cgroup = str(supervisor.cgroup.path) if supervisor.cgroup else None
        guardian = Guardian(supervisor.marker, context.run_id, remove, cgroup=cgroup)
        stack.callback(guardian.close)
        ignored = {signal.SIGHUP} if conf.signals.ignore_sighup else set()
        self.agent = agent = ElasticAgent(
            spec,
            rdzv,
            supervisor,
            context=context,
            events=FanOutSink([events, status]),
            metrics=metrics,
            base_env=_worker_base_env(self.base_env, conf),
            log_prefix=conf.logs.prefix,
            forward_signals=self.valid.forward_signals,
            restart_policy=self.valid.restart_policy,
            crash_loop=CrashLoopJudge(conf.restart.no_progress, conf.restart.no_progress_uptime),
            checks_retry=(conf.checks.retry_for, conf.checks.retry_interval),
            exclusion=ExclusionJudge.of(conf.exclusion),
            faults=_fault_injector(self.valid),
            monitor=ResourceMonitor(conf.resources.interval) if conf.resources.interval else None,
            memory_limit=self.valid.memory_limit,
            lifecycle=self.lifecycle,
            hangs=_hang_detector(self.valid, timer),
            timers=timer,
            lease_listener=guardian.lease,
            stop_signals=_STOP_SIGNALS - ignored,
            preempt_signals=self.valid.preempt_signals,
            resumed=resumed(context.run_dir, context.run_id, self.base_env),
        )
        status.watch(supervisor.activity, lambda: agent.usage)
        if isinstance(timer, FileTimerServer):  # timers only for this run's workers' trees
            timer.accept_pids(worker_trees(supervisor.marker))
        timer.start()
        if threading.current_thread() is threading.main_thread():
            # Only the main thread may set handlers (launch() from another thread: the
            # caller's handlers stay, and a stop comes through them to it).
            stack.enter_context(
                handle_signals(
                    agent.request_stop,
                    _STOP_SIGNALS - ignored,
                    ignored,
                    wakeup_fd=supervisor.wake_fd,
                    then=self.late_stops,
                )
            )
        if view is not None:
            view.start()
            stack.callback(view.stop)
        return spec, agent.run()

    def _component(
        self, stack: contextlib.ExitStack, kind: ComponentKind, config: Any, close: str
    ) -> Any:
        """The selected component of ``kind``, made by its plugin's factory; its
        ``close`` method runs when the stack unwinds."""
        name = getattr(config, kind.name_key)
        try:
            spec = self.registry.get(kind, name)
        except KeyError:
            allowed = ", ".join(self.registry.names(kind))
            raise ConfigError(
                f"{kind.group}.{kind.name_key}", name, f"allowed: {allowed}"
            ) from None
        component = spec.factory(config, self.context)
        stack.callback(getattr(component, close))
        return component

    def _live_view(self, status: RunStatus, rdzv: RendezvousHandler) -> LiveView | None:
        """``logs.live``: ``auto`` = only when stderr is a terminal (and TERM is not
        dumb), and not for the points of a parallel sweep, which share one terminal (one
        table each would garble it). rich is imported only when a table is shown."""
        setting = self.valid.live
        if setting == "false" or (
            setting == "auto"
            and (
                self.shared_terminal
                or not sys.stderr.isatty()
                or os.environ.get("TERM", "dumb") == "dumb"
            )
        ):
            return None
        from elastic_runner.live import LiveView

        return LiveView(status, waiting=getattr(rdzv, "progress", lambda: None))


#: Every signal that stops a run (``signals.forward`` says which reach workers as such).
_STOP_SIGNALS = parse_signals("signals", list(HANDLED_SIGNALS))


def _health_server(status: RunStatus, host: str, port: int) -> HealthServer:
    try:
        server = HealthServer(status, host, port)
    except OSError as exc:
        raise ConfigError(
            "health.port", port, f"cannot listen on {host}:{port} ({exc.strerror or exc})"
        ) from None
    log.info("health endpoint: %s/healthz, %s/status", server.url, server.url)
    return server


def _supervisor(
    logs: LogsConfig,
    view: LiveView | None,
    memory_limit: int | None,
    console_streams: frozenset[int],
) -> ProcessSupervisor:
    """The process supervisor, its console teeing worker output (through the live view
    when there is one) from the ranks and streams ``logs`` lets through, its workers in a
    cgroup of the run where the machine allows."""
    console: Console | None = None
    if logs.tee:
        fds = {1: _fd_of(sys.stdout, 1), 2: _fd_of(sys.stderr, 2)}
        sink = view.sink if view else None
        console = (
            CollapsingConsole(fds, logs.collapse_window, sink=sink)
            if logs.collapse
            else Console(fds, sink=sink)
        )
    marker = uuid.uuid4().hex
    cgroup = contain(f"elastic-run.{os.getpid()}.{marker[:8]}", memory_limit)
    return ProcessSupervisor(
        marker=marker,
        console=console,
        console_ranks=logs.console_ranks,
        console_local_ranks=logs.console_local_ranks,
        console_streams=console_streams,
        cgroup=cgroup,
    )


def _fault_injector(valid: ValidConfig) -> FaultInjector | None:
    """``fault=...``: armed, and said loudly (a test of the restart path, never a job's
    normal run)."""
    if valid.fault is None:
        return None
    injector = FaultInjector(valid.fault)
    log.warning("FAULT INJECTION is on: %s", injector.summary)
    return None if isinstance(valid.fault, FailCheckFault) else injector


def _fd_of(stream: Any, default: int) -> int:
    """The descriptor behind ``stream``; ``default`` (the process's own 1 or 2) when it
    has none: a notebook's or pytest's ``capsys`` stream under :func:`launch`."""
    try:
        return int(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return default


def _hang_detector(valid: ValidConfig, timer: TimerServer) -> HangDetector | None:
    """Hang handling is set up only when asked for (a watchdog timeout, or a timer server
    workers can reach): faulthandler stacks put a directory on the workers' PYTHONPATH."""
    dog = valid.config.watchdog
    if not (dog.no_output_timeout or dog.heartbeat_timeout or timer.worker_env()):
        return None
    from elastic_runner.watchdog import HangDetector, Watchdog
    from elastic_runner.workers.stacks import StackDumper

    watchdog = Watchdog(dog.no_output_timeout, dog.heartbeat_timeout)
    return HangDetector(watchdog, None if dog.stacks == "none" else StackDumper(dog.stacks))


def _rendezvous_failed(
    exc: RendezvousError, context: RunContext, agent: ElasticAgent | None
) -> RunResult:
    print(f"elastic-run: rendezvous failed: {exc}", file=sys.stderr, flush=True)
    group = agent.group if agent else None
    return RunResult(
        state=WorkerState.FAILED,
        attempts=group.attempt if group else 0,
        restart_count=group.restart_count if group else 0,
        ended_because=f"rendezvous failed: {exc}",
        run_id=context.run_id,
        run_dir=context.run_dir,
        # another node's crash-loop verdict ends this node the same way
        no_progress=is_verdict(str(exc)),
    )


def _write_config(path: Path, config: Any, run_id: str) -> None:
    """The resolved configuration as YAML, with the run id filled in and every secret
    replaced by ``***`` (``rdzv.token``, ``rdzv.password``, a ``job.env`` variable such
    as ``HF_TOKEN``: :func:`~elastic_runner.config.redact`); readable by its owner only.
    libyaml where PyYAML has it: OmegaConf's pure-Python dumper cost about 6 ms of every
    start."""
    import yaml

    from elastic_runner.config import redact, write_private

    data = redact(dataclasses.asdict(config))
    data["rdzv"]["id"] = run_id
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    write_private(path, str(yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True)))


def _worker_base_env(env: Mapping[str, str], conf: Any) -> dict[str, str]:
    """What workers inherit: the agent's environment less the token, plus what torch's
    agent puts in its own environment for them: ``TORCHELASTIC_SIGNALS_TO_HANDLE``, the
    signals that reach them as themselves (torchrun's ``--signals-to-handle``), and
    ``TORCHELASTIC_HEALTH_CHECK_PORT``, the health endpoint's port when there is one
    (torch's agent reads it to start its health server; its workers inherit it)."""
    inherited = _without_secrets(env, conf.rdzv)
    inherited["TORCHELASTIC_SIGNALS_TO_HANDLE"] = ",".join(
        f"SIG{name.upper().removeprefix('SIG')}" for name in conf.signals.forward
    )
    if conf.health.port:
        inherited["TORCHELASTIC_HEALTH_CHECK_PORT"] = str(conf.health.port)
    return inherited


def _without_secrets(env: Mapping[str, str], rdzv: Any) -> dict[str, str]:
    """The agent's environment for its workers, less the variables that carry the
    rendezvous token (``$ELASTIC_RUNNER_RDZV_TOKEN``, ``rdzv.token_env``): a worker
    needs no key to the store, and should not be able to end the job with it."""
    secret = {TOKEN_ENV, getattr(rdzv, "token_env", None) or TOKEN_ENV}
    return {k: v for k, v in env.items() if k not in secret}
