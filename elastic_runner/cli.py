"""``elastic-run``: Hydra composes the config, then one elastic run per job (per sweep point
with ``--multirun``). The only module that knows Hydra's objects.

``elastic-run [OVERRIDES...] torchrun ARGS...`` runs a torchrun command line
(:mod:`elastic_runner.torchrun`): the same config, composed from torchrun's options.

Exit codes: 0 success; 1 the job failed; 2 bad configuration (one line on stderr naming
the key, the value and what is allowed); 75 preempted (a signal of ``signals.preempt``);
93 no progress, do not requeue (:mod:`elastic_runner.crash_loop`); 128+N stopped by
signal N.
"""

from __future__ import annotations

# ruff: noqa: E402  (the imports follow the collector's pause below, on purpose)
import gc

# The imports below create ~60k objects that live as long as the process (modules,
# classes, Hydra's and OmegaConf's tables) and almost no garbage: the cyclic collector's
# passes over them (~90 young and 8 middle-generation collections) cost ~20 ms of CPU per
# start. So it is paused while they run, and they are frozen (left out of every later
# collection) when it resumes: resuming without the freeze costs as much again in one
# pass over them. :class:`_StartupGC` does the same for the rest of start-up.
_GC_WAS_ENABLED = gc.isenabled()
gc.disable()

import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf

from elastic_runner.config import (
    ElasticRunConfig,
    describe_config_error,
    one_line,
    quote_null_options,
    redact,
    register_configs,
    validate,
)
from elastic_runner.config_patch import ConfigPatch
from elastic_runner.errors import ConfigError
from elastic_runner.hydra_errors import (
    check_run_dir,
    describe_hydra_error,
    describe_run_dir_error,
)
from elastic_runner.plugins import LoadedPlugins, PluginLoadWarning, load_plugins
from elastic_runner.registry import ComponentKind, PluginError
from elastic_runner.resources import conf_dir, example_path
from elastic_runner.run import run
from elastic_runner.schedulers.slurm import SlurmError
from elastic_runner.schedulers.slurm import command_line as slurm_command_line
from elastic_runner.signals import LateStops
from elastic_runner.sweep import PointResult
from elastic_runner.torchrun.hints import misuse_hint
from elastic_runner.workers.logs import guard_log_files

if _GC_WAS_ENABLED:
    gc.freeze()
    gc.enable()

__all__ = ["main", "run_job"]

EXIT_CONFIG_ERROR = 2


def main() -> None:
    """Console entry point of ``elastic-run``."""
    startup_gc = _StartupGC()
    try:
        _main(startup_gc)
    finally:
        startup_gc.close()


def _main(startup_gc: _StartupGC) -> None:
    base_env = dict(os.environ)
    torchrun_form = None
    if "torchrun" in sys.argv[1:]:  # lazy: the torchrun front end costs ~7 ms to import
        from elastic_runner.torchrun.front import split_torchrun_form

        torchrun_form = split_torchrun_form(sys.argv[1:])
    if torchrun_form is None:
        if "--version" in sys.argv[1:]:  # Hydra's flag would print Hydra's version
            from elastic_runner import __version__

            print(f"elastic-run {__version__}")
            sys.exit(0)
        if hint := misuse_hint(sys.argv[1:]):
            _config_error(hint)
    with warnings.catch_warnings():
        # one line each, below, instead of Python's two-line warning format
        warnings.simplefilter("ignore", PluginLoadWarning)
        try:
            plugins = load_plugins()
        except PluginError as exc:  # a plugin implements a hook that does not exist ...
            _config_error(str(exc))
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
    patch: ConfigPatch | None = None
    if torchrun_form is not None:
        from elastic_runner.torchrun.front import TorchrunUsageError, prepare

        try:
            sys.argv[1:], patch = prepare(
                *torchrun_form,
                environ=base_env,
                backends=plugins.registry.names(ComponentKind.RENDEZVOUS),
            )
        except TorchrunUsageError as exc:
            print(f"elastic-run torchrun: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFIG_ERROR)
    else:  # under srun: the rendezvous across the step's nodes (Slurm mode)
        try:
            sys.argv[1:], patch = slurm_command_line(sys.argv[1:], base_env)
        except SlurmError as exc:
            _config_error(one_line(str(exc)))
    sys.argv[1:] = quote_null_options(sys.argv[1:])

    codes: list[int] = []

    def task(cfg: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf.errors import OmegaConfBaseException

        startup_gc.run_starts()
        started = time.monotonic()
        hydra_cfg = HydraConfig.get()
        guard_log_files(logging.getLogger())  # elastic-run.log on a full disk: one warning
        if problem := check_run_dir(hydra_cfg.runtime.output_dir):  # before any worker
            print(f"elastic-run: error: {problem}", file=sys.stderr, flush=True)
            codes.append(EXIT_CONFIG_ERROR)  # and no result.json: it cannot be written
            return
        # a sweep stops on a signal held until the point's result is written
        multirun = str(hydra_cfg.mode) == "RunMode.MULTIRUN"
        with LateStops(deliver=multirun) as late_stops:
            try:
                outcome = run_job(cfg, plugins, base_env, patch, late_stops)
            except (ConfigError, OmegaConfBaseException) as exc:  # before any worker started
                message: str | None
                if isinstance(exc, ConfigError):
                    message = describe_config_error(exc)
                    message = patch.describe(exc, message) if patch else message
                else:
                    message = describe_hydra_error(exc, sys.argv[1:], plugins.broken)
                print(f"elastic-run: error: {message}", file=sys.stderr, flush=True)
                outcome = PointResult(
                    [],
                    EXIT_CONFIG_ERROR,
                    "CONFIG ERROR",
                    0.0,
                    hydra_cfg.runtime.output_dir,
                    error=message,
                )
            # unresolved (an override may hold "${...}"), secrets as ***
            outcome.overrides = redact(OmegaConf.to_container(hydra_cfg.overrides.task))
            outcome.seconds = round(time.monotonic() - started, 3)
            outcome.num = OmegaConf.select(hydra_cfg, "job.num", default=None)  # type: ignore[arg-type]
            outcome.write()  # whatever happened; a failure is one line, the exit code stays
            codes.append(outcome.exit_code)

    # Hydra re-raises instead of printing its own multi-line report; we print one line.
    job_dirs: list[str] = []
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with (
            _skip_mode_probe(sys.argv[1:]),
            _share_config_store(),
            _remember_job_dirs(job_dirs),
        ):
            hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(
                task
            )()
    except ConfigError as exc:
        _config_error(describe_config_error(exc))
    except BrokenPipeError:  # `elastic-run --help | head`: the reader has gone, as for cat
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _exit_now(128 + signal.SIGPIPE)
    except Exception as exc:
        # Hydra makes the run directory and writes into it before the task runs
        message = describe_run_dir_error(exc, job_dirs) or describe_hydra_error(
            exc, sys.argv[1:], plugins.broken
        )
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


def run_job(
    cfg: DictConfig,
    plugins: LoadedPlugins,
    base_env: Mapping[str, str],
    patch: ConfigPatch | None = None,
    late_stops: LateStops | None = None,
) -> PointResult:
    """One whole elastic run from a config Hydra composed (and the values a torchrun
    command line gives it); returns how it ended. ``late_stops`` holds a stop signal that
    comes after the run's loop."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir).resolve()
    # the points of a parallel sweep share the terminal
    shared_terminal = str(hydra_cfg.mode) == "RunMode.MULTIRUN" and "BasicLauncher" not in str(
        OmegaConf.select(hydra_cfg, "launcher._target_", default="")  # type: ignore[arg-type]
    )
    if patch is not None:
        patch.apply(cfg)
    conf: ElasticRunConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    result = run(
        validate(conf),
        plugins,
        run_dir=run_dir,
        base_env=base_env,
        shared_terminal=shared_terminal,
        late_stops=late_stops,
    )
    return PointResult.of_run(result)


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


class _StartupGC:
    """Pauses the cyclic garbage collector from the start of :func:`main` until the
    composed run starts (the first job's task), then freezes what start-up built.

    Start-up (imports, plugins, Hydra's composition) allocates ~90k objects that live as
    long as the agent and leaves ~7k in garbage cycles: with the collector on, its passes
    over them cost 45-65 ms of CPU per start (measured: 117 young, 11 middle and one full
    collection), ~10% of an agent's start. Frozen (``gc.freeze``), they are left out of
    the agent's later collections too; the price is that start-up's garbage cycles (about
    1.2 MiB) stay. Nothing changes when the collector was off already."""

    def __init__(self) -> None:
        self._enabled = gc.isenabled()
        self._frozen = False
        gc.disable()

    def run_starts(self) -> None:
        """The job starts: freeze start-up's objects and turn the collector back on (at
        the first job only; later sweep points run with the collector on)."""
        if self._enabled and not self._frozen:
            gc.freeze()
            self._frozen = True
            gc.enable()

    def close(self) -> None:
        """Leave the collector as it was found (an in-process caller, e.g. a test)."""
        if self._frozen:
            gc.unfreeze()
        if self._enabled:
            gc.enable()


@contextlib.contextmanager
def _share_config_store() -> Iterator[None]:
    """Hydra deep-copies its config repository for each composition, and with it the
    ConfigStore singleton (~10 ms for our schemas: 27 structured configs), only to keep
    the repository's list of sources unchanged. The store is not mutated by a
    composition (each config it hands out is a deep copy already), so the copy shares it.
    """
    from hydra.core.config_store import ConfigStore

    previous = vars(ConfigStore).get("__deepcopy__")
    ConfigStore.__deepcopy__ = lambda self, memo: self  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if previous is None:
            del ConfigStore.__deepcopy__  # type: ignore[attr-defined]
        else:
            ConfigStore.__deepcopy__ = previous  # type: ignore[attr-defined]


@contextlib.contextmanager
def _remember_job_dirs(dirs: list[str]) -> Iterator[None]:
    """Keep in ``dirs`` the directories Hydra is making, the job's run directory first,
    then the sweep's: Hydra forgets them when making or writing one fails, and the
    one-line error names the directory."""
    from hydra._internal.hydra import Hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    def select(cfg: DictConfig, key: str) -> str | None:
        with contextlib.suppress(Exception):  # not set yet, or not resolvable
            found = OmegaConf.select(cfg, key, default=None)
            return str(found) if found else None
        return None

    compose, set_config = Hydra.compose_config, HydraConfig.set_config

    def composed(self: Hydra, *args: Any, **kwargs: Any) -> DictConfig:
        cfg = compose(self, *args, **kwargs)
        sweep = kwargs.get("run_mode") == RunMode.MULTIRUN
        dirs[:] = [d for d in [select(cfg, "hydra.sweep.dir" if sweep else "hydra.run.dir")] if d]
        return cfg

    def job_set(self: HydraConfig, cfg: DictConfig) -> None:
        set_config(self, cfg)
        if (output_dir := select(cfg, "hydra.runtime.output_dir")) and output_dir not in dirs:
            dirs.insert(0, output_dir)

    Hydra.compose_config = composed  # type: ignore[method-assign]
    HydraConfig.set_config = job_set  # type: ignore[method-assign]
    try:
        yield
    finally:
        Hydra.compose_config = compose  # type: ignore[method-assign]
        HydraConfig.set_config = set_config  # type: ignore[method-assign]


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
