"""torchrun's command line, read as torch 2.13's parser reads it.

The options, their spellings, types, defaults and ``PET_*`` fallbacks are those of
``torch/distributed/run.py: get_args_parser`` (command line beats environment beats
default), so a launcher's line means here what it means to torchrun. argparse does the
parsing, as in torch, so abbreviations (``--max-r 3``) and the script's arguments after it
(kept verbatim, even when they look like options) behave the same.

Where torch's parser fails on input that launchers really send, this one accepts it:
``PET_STANDALONE=""`` (Kubeflow's training-operator sets exactly that for a standalone
elastic job; torch stops with ``invalid literal for int()``) means on. An empty ``PET_*``
value otherwise counts as unset. Every error is one line.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

__all__ = ["IGNORED_OPTIONS", "TorchrunArgs", "TorchrunUsageError", "parse_torchrun_args"]

PROG = "elastic-run torchrun"


class TorchrunUsageError(ValueError):
    """A torchrun command line or ``PET_*`` variable that cannot be used; the message is
    one line."""


@dataclass(frozen=True)
class TorchrunArgs:
    """What torchrun's parser decides, field for field (torch's ``dest`` names)."""

    nnodes: str = "1:1"
    nproc_per_node: str = "1"
    rdzv_backend: str = "static"
    rdzv_endpoint: str = ""
    rdzv_id: str = "none"
    rdzv_conf: str = ""
    standalone: bool = False
    max_restarts: int = 0
    monitor_interval: float = 0.1
    start_method: str = "spawn"
    event_log_handler: str = "null"
    role: str = "default"
    module: bool = False
    no_python: bool = False
    run_path: bool = False
    log_dir: str | None = None
    redirects: str = "0"
    tee: str = "0"
    local_ranks_filter: str = ""
    duplicate_stdout_filters: list[str] = field(default_factory=list)
    duplicate_stderr_filters: list[str] = field(default_factory=list)
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    local_addr: str | None = None
    logs_specs: str | None = None
    numa_binding: str | None = None
    signals_to_handle: str = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    shutdown_timeout: int | None = None
    virtual_local_rank: bool = False
    training_script: str = ""
    training_script_args: list[str] = field(default_factory=list)
    #: ``dest`` of every option given on the command line or through ``PET_*``.
    given: frozenset[str] = frozenset()
    #: ``dest`` of the options given through ``PET_*`` only.
    from_env: frozenset[str] = frozenset()


#: Options torchrun has that change nothing here, with the reason (one note line names
#: those a command line sets).
IGNORED_OPTIONS: Mapping[str, str] = {
    "monitor_interval": "workers' exits are seen at once (pidfd), not polled",
    "start_method": "workers are always started as new processes",
    "event_log_handler": "events go to the run directory's events.jsonl (see events=)",
    "logs_specs": "logs go to the run directory",
    "numa_binding": "not supported",
    "duplicate_stdout_filters": "not supported",
    "duplicate_stderr_filters": "not supported",
    "virtual_local_rank": "not supported",
}


def _comma_list(value: str) -> list[str]:
    """torch's ``comma_separated_list``: ``a,b`` -> [a, b]; ``,,`` is a literal comma."""
    placeholder = "\0"
    return [item.replace(placeholder, ",") for item in value.replace(",,", placeholder).split(",")]


@dataclass(frozen=True)
class _Option:
    flags: tuple[str, ...]
    kind: Callable[[str], Any] | None = str  # None: a flag
    choices: tuple[str, ...] | None = None
    env: bool = True  # torch reads PET_<DEST> for it

    @property
    def dest(self) -> str:
        longs = [f for f in self.flags if f.startswith("--")]
        return longs[0][2:].replace("-", "_")


# torch 2.13's get_args_parser, in its order.
_OPTIONS = (
    _Option(("--nnodes",)),
    _Option(("--nproc-per-node", "--nproc_per_node")),
    _Option(("--rdzv-backend", "--rdzv_backend")),
    _Option(("--rdzv-endpoint", "--rdzv_endpoint")),
    _Option(("--rdzv-id", "--rdzv_id")),
    _Option(("--rdzv-conf", "--rdzv_conf")),
    _Option(("--standalone",), None),
    _Option(("--max-restarts", "--max_restarts"), int),
    _Option(("--monitor-interval", "--monitor_interval"), float),
    _Option(("--start-method", "--start_method"), str, ("spawn", "fork", "forkserver")),
    _Option(("--event-log-handler", "--event_log_handler")),
    _Option(("--role",)),
    _Option(("-m", "--module"), None),
    _Option(("--no-python", "--no_python"), None),
    _Option(("--run-path", "--run_path"), None),
    _Option(("--log-dir", "--log_dir")),
    _Option(("-r", "--redirects")),
    _Option(("-t", "--tee")),
    _Option(("--local-ranks-filter", "--local_ranks_filter")),
    _Option(("--duplicate-stdout-filters", "--duplicate_stdout_filters"), _comma_list),
    _Option(("--duplicate-stderr-filters", "--duplicate_stderr_filters"), _comma_list),
    _Option(("--node-rank", "--node_rank"), int),
    _Option(("--master-addr", "--master_addr")),
    _Option(("--master-port", "--master_port"), int),
    _Option(("--local-addr", "--local_addr")),
    _Option(("--logs-specs", "--logs_specs"), env=False),
    _Option(
        ("--numa-binding", "--numa_binding"),
        str,
        ("node", "socket", "exclusive", "core-complex"),
        env=False,
    ),
    _Option(("--signals-to-handle", "--signals_to_handle")),
    _Option(("--shutdown-timeout", "--shutdown_timeout"), int),
    _Option(("--virtual-local-rank", "--virtual_local_rank"), None),
)

#: Every option string torchrun takes (``--nproc-per-node``, ``-m`` ...).
OPTION_STRINGS: frozenset[str] = frozenset(f for o in _OPTIONS for f in o.flags)

_KIND_NAMES: Mapping[object, str] = {int: "int", float: "float"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        if "training_script" in message:
            message = (
                "the training script is missing: elastic-run torchrun [options] "
                "train.py [args] (or -m package.module [args])"
            )
        raise TorchrunUsageError(message)


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Run a torchrun command line under elastic-run: every option of torchrun 2.13, "
            "with its PET_* environment fallback. Add elastic-run's own settings as "
            "overrides before 'torchrun' (elastic-run watchdog.no_output_timeout=300 "
            "torchrun ...) or in ELASTIC_RUN_OVERRIDES."
        ),
        add_help=True,
    )
    for option in _OPTIONS:
        dest = option.dest
        note = f"(or ${'PET_' + dest.upper()})" if option.env else None
        if option.kind is None:
            parser.add_argument(
                *option.flags, dest=dest, action="store_true", default=None, help=note
            )
        else:
            parser.add_argument(
                *option.flags,
                dest=dest,
                type=option.kind,
                choices=option.choices,
                default=None,
                help=note,
            )
    parser.add_argument("training_script", type=str, help="a script, or a module with -m")
    parser.add_argument(
        "training_script_args", nargs=argparse.REMAINDER, help="passed to it as they are"
    )
    return parser


def _flag_from_env(name: str, text: str) -> bool:
    if name == "PET_STANDALONE" and not text.strip():
        return True  # Kubeflow's training-operator: standalone elastic jobs get ""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    try:
        return bool(int(lowered))
    except ValueError:
        raise TorchrunUsageError(f"{name}={text!r}: expected 1 or 0") from None


def _value_from_env(option: _Option, name: str, text: str) -> Any:
    assert option.kind is not None
    try:
        value = option.kind(text)
    except (TypeError, ValueError):
        kind = _KIND_NAMES.get(option.kind, "value")
        raise TorchrunUsageError(
            f"{name}={text!r}: invalid {kind} value (for {'/'.join(option.flags)})"
        ) from None
    if option.choices is not None and value not in option.choices:
        allowed = ", ".join(option.choices)
        raise TorchrunUsageError(f"{name}={text!r}: invalid choice (choose from {allowed})")
    return value


def parse_torchrun_args(argv: Sequence[str], environ: Mapping[str, str]) -> TorchrunArgs:
    """Read a torchrun command line (without ``torchrun`` itself) and the ``PET_*``
    variables of ``environ``, with torchrun's precedence. Raises
    :class:`TorchrunUsageError` (one line) on bad input. ``--help`` prints the usage and
    exits 0, as argparse does."""
    namespace = _parser().parse_args(list(argv))
    values: dict[str, Any] = {}
    given: set[str] = set()
    from_env: set[str] = set()
    for option in _OPTIONS:
        dest = option.dest
        value = getattr(namespace, dest)
        if value is not None:
            values[dest] = value
            given.add(dest)
            continue
        name = f"PET_{dest.upper()}"
        text = environ.get(name) if option.env else None
        if text is None or (not text.strip() and name != "PET_STANDALONE"):
            continue
        values[dest] = (
            _flag_from_env(name, text)
            if option.kind is None
            else _value_from_env(option, name, text)
        )
        given.add(dest)
        from_env.add(dest)
    return dataclasses.replace(
        TorchrunArgs(),
        **values,
        training_script=namespace.training_script,
        training_script_args=list(namespace.training_script_args),
        given=frozenset(given),
        from_env=frozenset(from_env),
    )


def print_help() -> None:
    """Print the torchrun form's usage and options."""
    _parser().print_help()
