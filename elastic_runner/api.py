"""The Python API: :func:`launch` runs one node of an elastic job from Python, on the same
assembly step (:func:`elastic_runner.run.run`) and with the same configuration keys as
``elastic-run``, and returns its :class:`~elastic_runner.spec.RunResult`.

The entrypoint is a function (each worker process calls it and its return value comes
back in ``RunResult.return_values``) or a script, program or module as on the command
line. Everything else is what ``elastic-run`` does: rendezvous with the other nodes that
launch with the same settings, restarts, logs, events, the watchdog; it runs in the
caller's process, which keeps nothing of it when ``launch`` returns or raises: no signal
handler (set only when called from the main thread), thread, descriptor, logging handler
or child process.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elastic_runner.errors import ConfigError
from elastic_runner.spec import Failure, RunResult

if TYPE_CHECKING:
    from elastic_runner.config import ValidConfig
    from elastic_runner.plugins import LoadedPlugins

__all__ = ["ChildFailedError", "LaunchError", "launch"]

log = logging.getLogger("elastic_runner")

#: Hydra's ConfigStore, its search-path plugins and HydraConfig are process-wide: one
#: composition at a time (a launch from several threads at once is allowed).
_COMPOSE_LOCK = threading.Lock()

#: The worker side of a function entrypoint.
_CALL_MODULE = "elastic_runner.workers.call"


class LaunchError(ValueError):
    """The run could not start: bad configuration or arguments, named in one line (what
    ``elastic-run`` prints before it exits 2). No worker started."""


class ChildFailedError(RuntimeError):
    """The job did not succeed (``launch(..., raise_on_failure=True)``). The message is
    the root cause in one line (``rank 1: exit code 1: ValueError: bad batch``), or why the
    run ended when no worker failed (a signal, a failed rendezvous); ``result`` is the
    whole :class:`~elastic_runner.spec.RunResult`."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        root = result.root_cause
        text = root.summary() if root else (result.ended_because or result.state.value)
        super().__init__(text)

    def __reduce__(self) -> tuple[type[ChildFailedError], tuple[RunResult]]:
        # raised in a multiprocessing worker, it crosses to the parent whole
        return ChildFailedError, (self.result,)

    @property
    def failures(self) -> dict[int, Failure]:
        """Global rank -> failure, root cause first (torch's ``ChildFailedError.failures``)."""
        return {f.rank: f for f in self.result.failures}

    def get_first_failure(self) -> tuple[int, Failure]:
        """The root cause as ``(global rank, failure)``, as torch's method returns it.
        Raises ``LookupError`` when no worker failed (the run was stopped)."""
        root = self.result.root_cause
        if root is None:
            raise LookupError(f"no worker failed: {self}")
        return root.rank, root


def launch(
    entrypoint: Callable[..., Any] | str | os.PathLike[str] | None = None,
    args: Sequence[Any] = (),
    overrides: Sequence[str] = (),
    *,
    kwargs: Mapping[str, Any] | None = None,
    module: str | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str | None] | None = None,
    raise_on_failure: bool = True,
) -> RunResult:
    """Run this node of an elastic job until it succeeds, fails for good or is stopped.

    ``entrypoint`` is a callable, called in each worker process as
    ``entrypoint(*args, **kwargs)`` with the worker environment of ``elastic-run``
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...); or a script or program path, run with
    ``args`` (strings) as on the command line; or ``None`` with ``module`` (``python -m``)
    or with a ``+job=`` preset in ``overrides``. ``overrides`` are ``elastic-run``'s,
    in Hydra's syntax (``["job.nproc_per_node=2", "rdzv=tcp", "rdzv.id=job1",
    "rdzv.endpoint=node0:29400", "nnodes=2"]``);
    ``config_dir`` adds a directory of configs (your own ``job/`` presets). ``run_dir`` is
    this node's run directory (default ``outputs/<date>/<time>`` under the current
    directory, as for ``elastic-run``); ``env`` adds (``None``: removes) variables of the
    workers' environment.

    Returns the :class:`~elastic_runner.spec.RunResult`, with each rank's return value
    in ``return_values``. Raises :class:`ChildFailedError` when the job did not succeed
    and ``raise_on_failure`` is true (``KeyboardInterrupt`` when Ctrl-C stopped it, after
    every worker is gone), :class:`LaunchError` when it cannot start.
    """
    from elastic_runner.run import run
    from elastic_runner.signals import LateStops

    if isinstance(overrides, (str, bytes)) or not all(isinstance(o, str) for o in overrides):
        raise LaunchError("overrides: a list of strings such as ['job.nproc_per_node=2']")
    if hydra_keys := [o for o in overrides if o.lstrip("+~").startswith(("hydra.", "hydra/"))]:
        raise LaunchError(
            f"{hydra_keys[0]}: Hydra's own settings do not apply to launch(); "
            "the run directory is run_dir="
        )
    started = time.monotonic()
    base_env = _environment(env)
    plugins = _plugins()
    given, call = _entrypoint_values(entrypoint, args, kwargs or {}, module)
    where = _run_dir(run_dir)
    try:
        valid, hydra_overrides = _configure(
            list(overrides), given, config_dir, where, plugins, base_env
        )
        if call is not None:
            from elastic_runner.workers.call import UnsendableError, write_payload

            try:
                write_payload(where / _PAYLOAD, *call)
            except UnsendableError as exc:
                raise LaunchError(str(exc)) from None
    except BaseException:
        _remove_if_empty(where)
        raise
    # a stop signal after the run's loop reaches the caller once result.json is written
    with LateStops(deliver=True) as late_stops:
        try:
            with _run_log(where):
                result = run(
                    valid, plugins, run_dir=where, base_env=base_env, late_stops=late_stops
                )
        except ConfigError as exc:  # found while building (a busy health port ...)
            from elastic_runner.config import describe_config_error

            raise LaunchError(describe_config_error(exc)) from None
        finally:
            with contextlib.suppress(OSError):
                (where / _PAYLOAD).unlink()
        unreadable = _collect_returns(result, where)
        _write_result(result, hydra_overrides, time.monotonic() - started)
    if unreadable:
        raise RuntimeError(unreadable)
    if raise_on_failure and result.exit_code != 0:
        if result.signal == signal.SIGINT and threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt
        raise ChildFailedError(result)
    return result


#: The pickled call in the run directory, for the workers (removed when the run ends).
_PAYLOAD = "launch-call.pkl"


def _environment(env: Mapping[str, str | None] | None) -> dict[str, str]:
    base = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            base.pop(key, None)
        elif not isinstance(value, str):
            raise LaunchError(f"env[{key!r}]: a string or None, not {type(value).__name__}")
        else:
            base[key] = value
    return base


def _plugins() -> LoadedPlugins:
    from elastic_runner.config import register_configs
    from elastic_runner.plugins import PluginLoadWarning, load_plugins
    from elastic_runner.registry import PluginError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        try:
            plugins = load_plugins()
        except PluginError as exc:
            raise LaunchError(str(exc)) from None
    for broken in plugins.broken:
        log.warning("%s; skipped (selecting what it provides is an error)", broken.describe())
    with _COMPOSE_LOCK:
        try:
            register_configs(plugins.registry)
        except PluginError as exc:
            raise LaunchError(str(exc)) from None
    return plugins


def _entrypoint_values(
    entrypoint: Callable[..., Any] | str | os.PathLike[str] | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    module: str | None,
) -> tuple[dict[str, Any], tuple[Callable[..., Any], Sequence[Any], Mapping[str, Any]] | None]:
    """The ``job.*`` values the entrypoint gives, and the call to send for a function."""
    if isinstance(args, (str, bytes)):
        raise LaunchError(f"args: a sequence of arguments, not a {type(args).__name__}")
    if entrypoint is not None and module is not None:
        raise LaunchError("entrypoint and module: give one of them")
    if callable(entrypoint):
        # The payload path is relative to the run directory, filled in by _configure.
        call: dict[str, Any] = {
            "job.module": _CALL_MODULE,
            "job.entrypoint": None,
            "job.python": None,
        }
        return call, (entrypoint, tuple(args), dict(kwargs))
    if kwargs:
        raise LaunchError("kwargs: only for a function entrypoint")
    strings = []
    for arg in args:
        if not isinstance(arg, (str, int, float, os.PathLike)) or isinstance(arg, bool):
            raise LaunchError(
                f"args: {arg!r} ({type(arg).__name__}): a script's arguments are strings "
                "(numbers and paths are converted); Python objects go to a function"
            )
        strings.append(os.fspath(arg) if isinstance(arg, os.PathLike) else str(arg))
    if isinstance(entrypoint, (str, os.PathLike)):
        values: dict[str, Any] = {"job.entrypoint": os.fspath(entrypoint), "job.module": None}
    elif module is not None:
        values = {"job.module": module, "job.entrypoint": None}
    elif entrypoint is None:
        values = {}
    else:
        raise LaunchError(
            f"entrypoint: a function, a script or program path, or None; "
            f"not {type(entrypoint).__name__}"
        )
    if args:
        values["job.args"] = strings
    return values, None


def _run_dir(run_dir: str | os.PathLike[str] | None) -> Path:
    """This node's run directory, made now: ``outputs/<date>/<time with microseconds>``
    like ``elastic-run``'s, with a suffix when another launch made it the same
    microsecond (agents of one job started together from one directory)."""
    from elastic_runner.hydra_errors import check_run_dir

    if run_dir is not None:
        where = Path(run_dir).expanduser().resolve()
        if problem := check_run_dir(str(where)):
            raise LaunchError(problem)
        return where
    now = datetime.datetime.now()
    base = Path("outputs", now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S-%f")).resolve()
    for n in range(1000):
        where = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            where.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as exc:
            raise LaunchError(f"cannot make the run directory {where}: {exc.strerror}") from None
        return where
    raise LaunchError(f"cannot make a fresh run directory beside {base}")


def _remove_if_empty(where: Path) -> None:
    with contextlib.suppress(OSError):
        where.rmdir()


def _configure(
    overrides: list[str],
    given: dict[str, Any],
    config_dir: str | os.PathLike[str] | None,
    run_dir: Path,
    plugins: LoadedPlugins,
    base_env: Mapping[str, str],
) -> tuple[ValidConfig, list[str]]:
    """Compose, patch and validate: the same configuration ``elastic-run`` would run
    with these overrides (and, under ``srun``, Slurm mode's). Returns the valid config
    and the overrides (for ``result.json``)."""
    from omegaconf import OmegaConf

    from elastic_runner.config import (
        describe_config_error,
        one_line,
        quote_null_options,
        validate,
    )
    from elastic_runner.config_patch import ConfigPatch
    from elastic_runner.hydra_errors import describe_hydra_error
    from elastic_runner.schedulers.slurm import SlurmError
    from elastic_runner.schedulers.slurm import command_line as slurm_command_line

    overrides = quote_null_options(overrides)
    try:
        overrides, patch = slurm_command_line(overrides, base_env)
    except SlurmError as exc:
        raise LaunchError(one_line(str(exc))) from None
    if given.get("job.module") == _CALL_MODULE:
        given = {**given, "job.args": [str(run_dir / _PAYLOAD)]}
    values = {**(patch.values if patch else {}), **given}
    ours = ConfigPatch(values, patch.notes if patch else (), origin="launch")
    try:
        with _COMPOSE_LOCK:
            cfg = _compose(overrides, config_dir, run_dir)
            ours.apply(cfg)
            with _hydra_config(cfg):
                task = copy.deepcopy(cfg)
                with contextlib.suppress(Exception):
                    OmegaConf.set_readonly(task, False)
                    OmegaConf.set_struct(task, False)
                del task["hydra"]
                conf = OmegaConf.to_object(task)
        return validate(conf), overrides  # type: ignore[arg-type]
    except ConfigError as exc:
        raise LaunchError(describe_config_error(exc)) from None
    except LaunchError:
        raise
    except Exception as exc:  # Hydra's and OmegaConf's errors, described in one line
        message = describe_hydra_error(exc, overrides, plugins.broken)
        if message is None:
            raise
        raise LaunchError(message) from None


def _compose(overrides: list[str], config_dir: str | os.PathLike[str] | None, run_dir: Path) -> Any:
    """The config Hydra composes for ``overrides`` (``hydra`` node included), without
    Hydra's global instance: a Hydra application may call :func:`launch` too."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    from elastic_runner.resources import conf_dir, example_path

    OmegaConf.register_new_resolver("er.example", example_path, replace=True)
    search_path = create_config_search_path(str(conf_dir()))
    if config_dir is not None:
        extra = Path(config_dir).expanduser().resolve()
        if not extra.is_dir():
            raise LaunchError(f"config_dir={config_dir}: not a directory ({extra})")
        search_path.prepend(
            provider="launch", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema")
        )
    loader = ConfigLoaderImpl(config_search_path=search_path)
    cfg = loader.load_configuration(
        config_name="config", overrides=overrides, run_mode=RunMode.RUN, from_shell=False
    )
    with open_dict(cfg.hydra.runtime):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = os.getcwd()
    return cfg


@contextlib.contextmanager
def _hydra_config(cfg: Any) -> Iterator[None]:
    """``${hydra:runtime.output_dir}`` (the ``resnet`` preset's checkpoints) resolves
    against ``cfg`` while the block runs; the caller's HydraConfig (a Hydra application
    calling launch) is put back after."""
    from hydra.core.hydra_config import HydraConfig

    holder = HydraConfig.instance()
    previous = holder.cfg
    holder.set_config(cfg)
    try:
        yield
    finally:
        holder.cfg = previous


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """elastic-run's own messages in ``<run dir>/elastic-run.log`` while the run lasts,
    secrets hidden, as under ``elastic-run``; the logger is left as it was."""
    from elastic_runner.config import RedactingFilter

    handler: logging.Handler | None
    try:
        handler = logging.FileHandler(run_dir / "elastic-run.log", encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write %s: %s", run_dir / "elastic-run.log", exc.strerror)
        handler = None
    if handler is not None:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.addFilter(RedactingFilter())
        log.addHandler(handler)
    level = log.level
    if level == logging.NOTSET:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.setLevel(level)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _collect_returns(result: RunResult, run_dir: Path) -> str | None:
    """Each worker's return value of the final attempt, by global rank, only for a run
    that succeeded, as in torch; the files of every attempt go (they may be large).
    Returns one line when a value cannot be unpickled here (a class the caller cannot
    import)."""
    from elastic_runner.workers.call import RETURN_FILE, read_return, return_path
    from elastic_runner.workers.logs import WorkerLogPaths

    problem = None
    for exit_ in result.exits:
        path = return_path(WorkerLogPaths.of(run_dir, result.attempts, exit_.local_rank).error_file)
        if not result.is_failed() and exit_.succeeded:
            try:
                result.return_values[exit_.global_rank] = read_return(path)
            except Exception as exc:
                problem = problem or (
                    f"rank {exit_.global_rank}'s return value cannot be loaded in the "
                    f"caller: {type(exc).__name__}: {exc}"
                )
    # every attempt's: a rank may have returned before another failed, or before the
    # job failed on another node
    for path in run_dir.glob(f"attempt_*/*/{RETURN_FILE}"):
        with contextlib.suppress(OSError):
            path.unlink()
    return problem


def _write_result(result: RunResult, overrides: list[str], seconds: float) -> None:
    """``result.json`` in the run directory, as ``elastic-run`` writes it."""
    from elastic_runner.config import redact
    from elastic_runner.sweep import PointResult

    outcome = PointResult.of_run(result)
    outcome.overrides = redact(list(overrides))
    outcome.seconds = round(seconds, 3)
    outcome.write()
