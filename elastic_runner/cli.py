"""``elastic-run``: Hydra composes the config, then one elastic run per job (per sweep point
with ``--multirun``). The only module that knows Hydra's objects.

Exit codes: 0 success; 1 the job failed; 2 bad configuration (one line on stderr naming
the key, the value and what is allowed); 128+N stopped by signal N.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from elastic_runner.agent import ElasticAgent
from elastic_runner.config import (
    HANDLED_SIGNALS,
    ConfigError,
    ElasticRunConfig,
    parse_memory,
    parse_nnodes,
    parse_nproc_per_node,
    parse_signals,
    register_configs,
    validate,
)
from elastic_runner.events import FanOutSink
from elastic_runner.health import HealthServer, RunStatus
from elastic_runner.hydra_errors import describe_hydra_error
from elastic_runner.lifecycle import Lifecycle
from elastic_runner.plugins import LoadedPlugins, PluginLoadWarning, load_plugins
from elastic_runner.registry import ComponentKind, PluginError, Registry
from elastic_runner.rendezvous.api import RendezvousError
from elastic_runner.report import format_report, write_nested_error_file
from elastic_runner.resources import conf_dir, example_path
from elastic_runner.signals import handle_signals
from elastic_runner.spec import (
    RestartPolicy,
    RunContext,
    RunResult,
    WorkerExit,
    WorkerSpec,
    WorkerState,
)
from elastic_runner.sweep import PointResult
from elastic_runner.timer.server import NoTimerServer
from elastic_runner.workers.command import resolve_command
from elastic_runner.workers.guardian import Guardian
from elastic_runner.workers.logs import CollapsingConsole, Console, WorkerLogPaths
from elastic_runner.workers.resources import ResourceMonitor
from elastic_runner.workers.supervisor import ProcessSupervisor

if TYPE_CHECKING:
    from elastic_runner.live import LiveView
    from elastic_runner.watchdog import HangDetector

__all__ = ["main", "run_job"]

log = logging.getLogger("elastic_runner")

EXIT_CONFIG_ERROR = 2


def main() -> None:
    """Console entry point of ``elastic-run``."""
    base_env = dict(os.environ)
    with warnings.catch_warnings():
        # one line each, below, instead of Python's two-line warning format
        warnings.simplefilter("ignore", PluginLoadWarning)
        plugins = load_plugins()
    for broken in plugins.broken:
        print(
            f"elastic-run: warning: {broken.describe()}; skipped (selecting what it "
            "provides is an error)",
            file=sys.stderr,
            flush=True,
        )
    try:
        register_configs(plugins.registry)
    except PluginError as exc:  # two plugins claim one name; a schema of the wrong base
        _config_error(str(exc))
    OmegaConf.register_new_resolver("er.example", example_path, replace=True)
    sys.argv[1:] = _quote_null_options(sys.argv[1:])

    codes: list[int] = []

    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf.errors import OmegaConfBaseException

        started = time.monotonic()
        hydra_cfg = HydraConfig.get()
        try:
            outcome = run_job(cfg, plugins, base_env)
        except (ConfigError, OmegaConfBaseException) as exc:  # before any worker started
            message = (
                str(exc)
                if isinstance(exc, ConfigError)
                else describe_hydra_error(exc, sys.argv[1:], plugins.broken)
            )
            print(f"elastic-run: error: {message}", file=sys.stderr, flush=True)
            outcome = PointResult(
                [],
                EXIT_CONFIG_ERROR,
                "CONFIG ERROR",
                0.0,
                hydra_cfg.runtime.output_dir,
                error=message,
            )
        outcome.overrides = list(hydra_cfg.overrides.task)
        outcome.seconds = round(time.monotonic() - started, 3)
        outcome.num = OmegaConf.select(hydra_cfg, "job.num", default=None)  # type: ignore[arg-type]
        with contextlib.suppress(OSError):
            outcome.write()
        codes.append(outcome.exit_code)

    # Hydra re-raises instead of printing its own multi-line report; we print one line.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with _skip_mode_probe(sys.argv[1:]):
            hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(
                task
            )()
    except ConfigError as exc:
        _config_error(str(exc))
    except Exception as exc:
        message = describe_hydra_error(exc, sys.argv[1:], plugins.broken)
        if message is None:
            raise
        _config_error(message)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    code = max(codes, default=0)
    if not any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        _exit_now(code)
    sys.exit(code)


def run_job(cfg: DictConfig, plugins: LoadedPlugins, base_env: Mapping[str, str]) -> PointResult:
    """One whole elastic run from a composed config; returns how it ended."""
    from hydra.core.hydra_config import HydraConfig

    registry = plugins.registry
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    # points of a parallel sweep share the terminal: one live table each would garble it
    shared_terminal = str(hydra_cfg.mode) == "RunMode.MULTIRUN" and "BasicLauncher" not in str(
        OmegaConf.select(hydra_cfg, "launcher._target_", default="")  # type: ignore[arg-type]
    )
    conf: ElasticRunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(conf)
    min_nodes, max_nodes = parse_nnodes(conf.nnodes)
    nproc = parse_nproc_per_node(conf.job.nproc_per_node)
    command = resolve_command(conf.job.entrypoint, conf.job.module, conf.job.args, env=base_env)
    run_id = conf.rdzv.id or uuid.uuid4().hex
    context = RunContext(run_id, run_dir, socket.gethostname(), min_nodes, max_nodes)
    timer = _build(registry, ComponentKind.TIMER, conf.timer, context)
    events = _build(registry, ComponentKind.EVENTS, conf.events, context)
    metrics = _build(registry, ComponentKind.METRICS, conf.metrics, context)
    status = RunStatus(
        run_id,
        context.node,
        restart_loop=conf.health.restart_loop,
        restart_window=conf.health.restart_window,
    )
    health = _health_server(conf, status)
    spec = WorkerSpec(
        role=conf.job.role,
        local_world_size=nproc,
        command=command,
        env={**conf.job.env, **timer.worker_env()},
        max_restarts=conf.max_restarts,
        stop_timeout=conf.stop_timeout,
    )
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(resolved, dict)
    resolved.setdefault("rdzv", {})["id"] = run_id
    (run_dir / "config.yaml").write_text(_to_yaml(resolved))
    lifecycle = Lifecycle(plugins.pm, context)
    try:
        rdzv = _build(registry, ComponentKind.RENDEZVOUS, conf.rdzv, context)
    except RendezvousError as exc:
        return _outcome(_rendezvous_failed(exc, lifecycle), run_dir, run_id)
    log.info(
        "run %s: %d worker(s) of %s; run directory: %s", run_id, nproc, " ".join(command), run_dir
    )
    live = str(conf.logs.live).lower()
    view = _live_view("false" if shared_terminal and live == "auto" else live, status, rdzv)
    supervisor, agent = _make_agent(
        conf, spec, rdzv, context, events, metrics, base_env, lifecycle, timer, status, view
    )
    timer.start()
    guardian = Guardian(supervisor.marker, run_id)
    try:
        handled = parse_signals("signals", list(HANDLED_SIGNALS))
        ignored = {signal.SIGHUP} if conf.signals.ignore_sighup else set()
        with handle_signals(agent.request_stop, handled - ignored, ignored):
            if view is not None:
                view.start()
            try:
                result = agent.run()
            finally:
                if view is not None:
                    view.stop()
    except RendezvousError as exc:
        return _outcome(_rendezvous_failed(exc, lifecycle, agent), run_dir, run_id)
    finally:
        supervisor.close()
        guardian.close()
        timer.stop()
        if health is not None:
            health.close()
        metrics.close()
        events.close()

    def stderr_of(exit_: WorkerExit) -> Path:
        return WorkerLogPaths.of(run_dir, result.attempts, exit_.local_rank).stderr

    print(format_report(result, spec, run_dir, stderr_of), file=sys.stderr, flush=True)
    lifecycle.run_end(result)
    if result.is_failed and (nested := base_env.get("TORCHELASTIC_ERROR_FILE")):
        write_nested_error_file(result, nested)
    return _outcome(result, run_dir, run_id)


def _outcome(result: RunResult, run_dir: Path, run_id: str) -> PointResult:
    root = result.root_cause
    error = None
    if root is not None:
        error = f"rank {root.exit.global_rank}: {root.describe()}"
        if root.message:
            error += f": {root.message}"
    state = result.state.value
    if result.signal is not None:
        state = f"STOPPED by {signal.Signals(result.signal).name}"
    return PointResult(
        overrides=[],
        exit_code=result.exit_code,
        state=state,
        seconds=0.0,
        run_dir=str(run_dir),
        run_id=run_id,
        attempts=result.attempts,
        restarts=result.restart_count,
        error=error or result.ended_because or None,
    )


def _make_agent(
    conf: ElasticRunConfig,
    spec: WorkerSpec,
    rdzv: Any,
    context: RunContext,
    events: Any,
    metrics: Any,
    base_env: Mapping[str, str],
    lifecycle: Lifecycle,
    timer: Any,
    status: RunStatus,
    view: LiveView | None,
) -> tuple[ProcessSupervisor, ElasticAgent]:
    logs = conf.logs
    console: Console | None = None
    if logs.tee:
        fds = {1: sys.stdout.fileno(), 2: sys.stderr.fileno()}
        sink = view.sink if view else None
        console = (
            CollapsingConsole(fds, logs.collapse_window, sink=sink)
            if logs.collapse
            else Console(fds, sink=sink)
        )
    supervisor = ProcessSupervisor(
        marker=uuid.uuid4().hex, console=console, console_ranks=logs.console_ranks
    )
    restart = conf.restart
    agent = ElasticAgent(
        spec,
        rdzv,
        supervisor,
        context=context,
        events=FanOutSink([events, status]),
        metrics=metrics,
        base_env=base_env,
        log_prefix=logs.prefix,
        forward_signals=parse_signals("signals.forward", conf.signals.forward),
        restart_policy=RestartPolicy(
            backoff_initial=restart.backoff.initial,
            backoff_factor=restart.backoff.factor,
            backoff_max=restart.backoff.max,
            min_uptime=restart.min_uptime,
            on_startup_failure=restart.on_startup_failure,
        ),
        monitor=ResourceMonitor(conf.resources.interval) if conf.resources.interval else None,
        memory_limit=parse_memory("job.limits.memory", conf.job.limits.memory),
        lifecycle=lifecycle,
        hangs=_hang_detector(conf, timer),
        timers=timer,
    )
    status.watch(supervisor.activity, lambda: agent.usage)
    return supervisor, agent


def _live_view(setting: str, status: RunStatus, rdzv: Any) -> LiveView | None:
    """``logs.live``: ``auto`` = only when stderr is a terminal (and TERM is not dumb).
    rich is imported only then."""
    if setting == "false" or (
        setting == "auto" and not (sys.stderr.isatty() and os.environ.get("TERM", "dumb") != "dumb")
    ):
        return None
    from elastic_runner.live import LiveView

    return LiveView(status, waiting=getattr(rdzv, "progress", lambda: None))


def _hang_detector(conf: ElasticRunConfig, timer: Any) -> HangDetector | None:
    """Hang handling is set up only when asked for (a watchdog timeout, a timer server):
    faulthandler stacks put a directory on the workers' PYTHONPATH."""
    dog = conf.watchdog
    if not (dog.no_output_timeout or dog.heartbeat_timeout) and isinstance(timer, NoTimerServer):
        return None
    from elastic_runner.watchdog import HangDetector, Watchdog
    from elastic_runner.workers.stacks import StackDumper

    watchdog = Watchdog(dog.no_output_timeout, dog.heartbeat_timeout)
    mode = dog.stacks
    return HangDetector(watchdog, None if mode == "none" else StackDumper(mode))


def _health_server(conf: ElasticRunConfig, status: RunStatus) -> HealthServer | None:
    if not conf.health.port:
        return None
    try:
        server = HealthServer(status, conf.health.host, conf.health.port)
    except OSError as exc:
        raise ConfigError(
            "health.port",
            conf.health.port,
            f"cannot listen on {conf.health.host}:{conf.health.port} ({exc.strerror or exc})",
        ) from None
    log.info("health endpoint: %s/healthz, %s/status", server.url, server.url)
    return server


def _rendezvous_failed(
    exc: RendezvousError, lifecycle: Lifecycle, agent: ElasticAgent | None = None
) -> RunResult:
    print(f"elastic-run: rendezvous failed: {exc}", file=sys.stderr, flush=True)
    group = agent.group if agent else None
    result = RunResult(
        state=WorkerState.FAILED,
        attempts=group.attempt if group else 0,
        restart_count=group.restart_count if group else 0,
        ended_because=f"rendezvous failed: {exc}",
    )
    lifecycle.run_end(result)
    return result


def _quote_null_options(argv: list[str]) -> list[str]:
    """``events=null`` selects the option named ``null``: Hydra's grammar reads an unquoted
    ``null`` as None, which it rejects for a config group with a traceback."""
    groups = "|".join(kind.group for kind in ComponentKind)
    return [re.sub(rf"^(\+{{0,2}}(?:{groups}))=null$", r"\1='null'", arg) for arg in argv]


@contextlib.contextmanager
def _skip_mode_probe(argv: list[str]) -> Iterator[None]:
    """Hydra 1.3 composes the whole config once just to read ``hydra.mode`` and again to
    run (about 50 ms, a sixth of our start-up). Our config never sets ``hydra.mode``, so
    unless the command line does, answer "not set" (what Hydra's probe returns then, and on
    any error) and let ``--multirun`` alone choose the mode, exactly as Hydra then does."""
    if any("hydra.mode" in arg for arg in argv):
        yield
        return
    from hydra._internal.hydra import Hydra

    probe = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.get_mode = probe  # type: ignore[method-assign]


def _to_yaml(data: dict[Any, Any]) -> str:
    """``data`` as YAML, with libyaml where PyYAML has it (OmegaConf's pure-Python
    dumper costs about 6 ms of every start)."""
    import yaml

    try:
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return str(yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True))
    except yaml.YAMLError:  # a value safe YAML cannot represent: OmegaConf can
        return OmegaConf.to_yaml(data)


def _build(registry: Registry, kind: ComponentKind, config: Any, context: RunContext) -> Any:
    name = getattr(config, kind.name_key)
    try:
        spec = registry.get(kind, name)
    except KeyError:
        allowed = ", ".join(registry.names(kind))
        raise ConfigError(f"{kind.group}.{kind.name_key}", name, f"allowed: {allowed}") from None
    return spec.factory(config, context)


def _exit_now(code: int) -> NoReturn:
    """Exit without tearing down the interpreter's modules (about 50 ms with Hydra loaded,
    paid by every stop): the run is over, its workers are gone and its files are closed;
    only logging and stdio buffers need flushing. (Multirun exits normally: parallel
    launchers clean up at exit.)"""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _config_error(message: str) -> NoReturn:
    print(f"elastic-run: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_CONFIG_ERROR)
