"""What a torchrun command line means in elastic-run's configuration.

:func:`translate` turns :class:`~elastic_runner.torchrun.options.TorchrunArgs` into the
config that the Hydra form (``elastic-run key=value ...``) would build: group choices as
Hydra overrides, every other value as a typed assignment to the composed config (so a
script argument, a role or a path reaches the run verbatim, never through Hydra's grammar
or OmegaConf's interpolation).

The rules are torchrun 2.13's (``torch/distributed/run.py: run, config_from_args``):

- ``--standalone``, and a ``static`` backend with no endpoint, no ``--master-port`` and
  one node at most (torch's "auto-standalone"), run on one node without a store:
  ``rdzv=local``. So does any one-node job (``--nnodes 1``, or ``localhost:0``): it needs
  no store, and the workers' environment is the same.
- ``c10d`` is the ``tcp`` backend (the store on the endpoint's host, ``is_host`` as torch
  decides it); ``etcd`` and ``etcd-v2`` are the ``etcd`` backend, which speaks etcd's v3
  API; ``static`` is ``static``. Another name is a rendezvous plugin of that name.
- ``static`` across nodes: torch's agent shares its store with the workers, at
  ``--master-port``; elastic-run's store speaks its own protocol, so it listens on the next
  port and the workers get ``MASTER_ADDR``/``MASTER_PORT`` exactly as under torchrun.
  ``--nnodes MIN:MAX`` waits for MAX nodes, as torch's static rendezvous does. With one
  node, ``rdzv=local`` pins the same ``MASTER_ADDR``/``MASTER_PORT``.
- The run id is torch's (its default ``none`` too), letters, digits, ``.``, ``_`` and
  ``-`` kept and any other character made ``_``; fresh where torch's is a uuid
  (standalone, auto-standalone).
- Endpoints are read as torch's ``parse_rendezvous_endpoint`` reads them (the port after
  the last colon, ``[v6]:port``), but a bare IPv6 address that this would cut into a
  host that is no address (``fe80::1``: ``fe80:``, port 1) is the host, whole.
- ``--rdzv-conf`` keys become ``rdzv.*`` keys (``join_timeout``, ``last_call_timeout``,
  ``close_timeout``, ``heartbeat_timeout``, ``is_host``; ``keep_alive_interval`` and
  ``keep_alive_max_attempt`` the heartbeat; ``timeout`` for static and etcd; etcd's TLS
  files); their values are checked as torch's rendezvous handler reads them, on one node
  too. Other keys are ignored with a note.
- ``--redirects``/``--tee``/``--local-ranks-filter`` become ``logs.console_streams`` and
  ``logs.console_local_ranks`` (files always get everything); where local ranks show
  different streams, each rank that shows any shows them all (a note says so).
- ``--log-dir D`` puts the run directory at ``D/<run id>_<random>`` (torch's log
  directory of the run); ``--log-dir ''`` is no log directory, as in torch.
- The script's arguments reach the workers as torch's agent passes them (each a
  ``string.Template`` given the local rank: ``${local_rank}``, ``$local_rank``, ``$$``);
  elastic-run's own ``%local_rank%`` is replaced too (a note names an argument where
  torch would leave a placeholder).
- ``--signals-to-handle`` names that are no signal are dropped with a note (torch warns
  and goes on).
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import secrets
import signal
import string
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from elastic_runner.spec import LOCAL_RANK_PLACEHOLDERS
from elastic_runner.torchrun.console import console_values, log_prefix_from_template
from elastic_runner.torchrun.options import IGNORED_OPTIONS, TorchrunArgs, TorchrunUsageError

__all__ = ["Translation", "hydra_quoted", "translate"]

#: torch's default ports: the c10d store, etcd, and the static master.
C10D_PORT = 29400
ETCD_PORT = 2379
MASTER_PORT = 29500

#: torch's rendezvous backend names -> elastic-run's.
_BACKENDS = {"c10d": "tcp", "static": "static", "etcd": "etcd", "etcd-v2": "etcd"}

#: ``--rdzv-conf`` keys -> ``rdzv.*`` keys and their type, per elastic-run backend.
_SECONDS = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout")
_CONF_KEYS: Mapping[str, Mapping[str, tuple[str, type]]] = {
    "tcp": {
        **{k: (k, float) for k in _SECONDS},
        "is_host": ("is_host", bool),
        "keep_alive_interval": ("heartbeat_interval", float),
    },
    "static": {"timeout": ("join_timeout", float)},
    "etcd": {
        "timeout": ("join_timeout", float),
        "join_timeout": ("join_timeout", float),
        "last_call_timeout": ("last_call_timeout", float),
        "heartbeat_timeout": ("heartbeat_timeout", float),
        "keep_alive_interval": ("heartbeat_interval", float),
        "cacert": ("ca_cert", str),
        "ca_cert": ("ca_cert", str),
        "cert": ("cert", str),
        "ssl_cert": ("cert", str),
        "key": ("key", str),
        "ssl_cert_key": ("key", str),
    },
}
#: Keys torch reads that have no equivalent here (the store's own timeouts and kind).
_CONF_IGNORED = frozenset(
    {"read_timeout", "store_type", "use_libuv", "timeout", "protocol", "etcd_prefix"}
)

_RUN_ID_CHAR = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Translation:
    """A torchrun command line as elastic-run configuration."""

    #: Hydra overrides: group choices (``rdzv=tcp``) and ``hydra.*`` settings.
    overrides: tuple[str, ...]
    #: Dotted config keys -> values, assigned to the composed config.
    values: Mapping[str, Any]
    #: One line each, for the agent's log: what was mapped how, what has no effect.
    notes: tuple[str, ...] = field(default=())


def _parse_nnodes(text: str) -> tuple[int, int]:
    parts = text.split(":")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        raise TorchrunUsageError(f"--nnodes={text!r}: expected N or MIN:MAX") from None
    if not 0 < lo <= hi:
        raise TorchrunUsageError(f"--nnodes={text!r}: expected 0 < MIN <= MAX")
    return lo, hi


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _split_endpoint(
    endpoint: str, default_port: int, option: str = "--rdzv-endpoint"
) -> tuple[str, int]:
    """torch's ``parse_rendezvous_endpoint``: ``host[:port]``, ``[v6]:port``, ``[v6]``;
    the port is what follows the last colon. Where that would cut a bare IPv6 address
    into a host that is none (``fe80::1`` -> ``fe80:`` and port 1, as torch does), the
    whole address is the host."""
    text = endpoint.strip()
    if not text:
        return "localhost", default_port
    rest: str | None = None
    if text.startswith("[") and text.endswith("]"):
        host = text
    else:
        host, sep, rest = text.rpartition(":")
        if not sep or (_is_ipv6(text) and not _is_ipv6(host.strip("[]"))):
            host, rest = text, None
    if len(host) > 1 and host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = default_port
    if rest is not None:
        if not re.fullmatch(r"[0-9]{1,5}", rest) or int(rest) >= 2**16:
            raise TorchrunUsageError(
                f"{option}={endpoint!r}: the port must be an integer from 0 to 65535"
            )
        port = int(rest)
    if not re.fullmatch(r"[\w.:-]+", host):
        raise TorchrunUsageError(f"{option}={endpoint!r}: {host!r} is not a host name or address")
    return host, port


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_rdzv_conf(text: str) -> dict[str, str]:
    """torch's ``_parse_rendezvous_config``: ``k=v,k=v``, every value non-empty."""
    conf: dict[str, str] = {}
    if not text.strip():
        return conf
    for item in text.strip().split(","):
        key, sep, value = item.partition("=")
        if not key.strip() or not sep or not value.strip():
            raise TorchrunUsageError(
                f"--rdzv-conf={text!r}: expected <key1>=<value1>,...,<keyN>=<valueN> "
                "with every key and value non-empty"
            )
        conf[key.strip()] = value.strip()
    return conf


def _conf_value(key: str, text: str, kind: type) -> Any:
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "t", "yes", "y"):
            return True
        if lowered in ("0", "false", "f", "no", "n"):
            return False
        raise TorchrunUsageError(
            f"--rdzv-conf {key}={text!r}: expected a boolean (1/0, true/false)"
        )
    if kind is float:
        try:
            return float(int(text))  # torch reads them with int()
        except ValueError:
            raise TorchrunUsageError(
                f"--rdzv-conf {key}={text!r}: expected a whole number of seconds"
            ) from None
    return text


def _run_id(text: str, notes: list[str]) -> str:
    """torch takes any run id; elastic-run's keys need ``[A-Za-z0-9._-]``, at most 128."""
    cleaned = _RUN_ID_CHAR.sub("_", text)[:128]
    if not cleaned or not cleaned[0].isalnum():
        cleaned = f"r{cleaned}"[:128]
    if cleaned != text:
        notes.append(f"--rdzv-id={text!r} is used as {cleaned!r} (letters, digits, '.', '_', '-')")
    return cleaned


def _rendezvous(
    args: TorchrunArgs,
    lo: int,
    hi: int,
    backends: Collection[str],
    values: dict[str, Any],
    notes: list[str],
) -> str:
    """Choose the backend and set its keys; returns the ``rdzv`` group choice."""
    backend, endpoint = args.rdzv_backend, args.rdzv_endpoint.strip()
    if args.standalone:
        if {"rdzv_backend", "rdzv_endpoint", "rdzv_id"} & args.given:
            notes.append("--standalone: --rdzv-backend, --rdzv-endpoint and --rdzv-id are ignored")
        _apply_conf(args, "tcp", {}, [])  # torch's c10d reads it: its values must be good
        return "local"  # a fresh run id, as torch's uuid4
    if backend == "static":
        if not endpoint and args.master_port is None and hi == 1:
            _apply_conf(args, "tcp", {}, [])
            return "local"  # torch's auto-standalone
        if endpoint:
            addr, port = _split_endpoint(endpoint, -1)
        else:  # torch's endpoint is then "master_addr:master_port", read as any other
            master_port = MASTER_PORT if args.master_port is None else args.master_port
            addr, port = _split_endpoint(
                f"{args.master_addr}:{master_port}", -1, "--master-addr/--master-port"
            )
        if port < 0:
            raise TorchrunUsageError(
                f"--rdzv-endpoint={endpoint!r}: a port is required with the static backend "
                "(or give --master-addr and --master-port)"
            )
        if not 0 <= args.node_rank < hi:
            raise TorchrunUsageError(
                f"--node-rank={args.node_rank}: expected 0 to {hi - 1} with --nnodes={args.nnodes}"
            )
        values["rdzv.master_addr"] = addr
        values["rdzv.master_port"] = port
        values["rdzv.id"] = _run_id(args.rdzv_id, notes)
        if hi == 1:
            _apply_conf(args, "static", {}, [])
            return "local"
        if lo != hi:
            notes.append(f"--nnodes={args.nnodes}: the static backend waits for {hi} nodes")
        if port >= 65535:
            raise TorchrunUsageError(
                f"--master-port={port}: the agents' store listens on the next port, so at "
                "most 65534"
            )
        values["nnodes"] = str(hi)
        values["rdzv.endpoint"] = _join(addr, port + 1)
        values["rdzv.node_rank"] = args.node_rank
        notes.append(
            f"static: the agents' store listens on {_join(addr, port + 1)}; the workers get "
            f"MASTER_ADDR={addr} MASTER_PORT={port}, as under torchrun"
        )
        _apply_conf(args, "static", values, notes)
        return "static"
    if args.node_rank != 0 and "node_rank" in args.given:
        notes.append(f"--node-rank is only used by the static backend; ignored for {backend}")
    if "master_addr" in args.given or "master_port" in args.given:
        notes.append(
            "--master-addr/--master-port are only used by the static backend; ignored for "
            f"{backend}"
        )
    choice = _BACKENDS.get(backend, backend)
    if choice not in _BACKENDS.values() and choice not in backends:
        known = ", ".join(
            [*_BACKENDS, *sorted(set(backends) - set(_BACKENDS.values()) - {"local"})]
        )
        raise TorchrunUsageError(f"--rdzv-backend={backend!r}: unknown backend; known: {known}")
    default_port = ETCD_PORT if choice == "etcd" else C10D_PORT
    host, port = _split_endpoint(endpoint, default_port)
    if hi == 1:  # one node needs no store: torchtitan's localhost:0 among others
        values["rdzv.id"] = _run_id(args.rdzv_id, notes)  # as torch's, "none" included
        _apply_conf(args, choice, {}, [])
        return "local"
    if port == 0:
        raise TorchrunUsageError(
            f"--rdzv-endpoint={endpoint!r}: port 0 picks a free port, which the other "
            f"nodes cannot know; give a port with --nnodes={args.nnodes}"
        )
    if backend in ("etcd", "etcd-v2"):
        notes.append(f"--rdzv-backend={backend}: elastic-run's etcd backend speaks etcd's v3 API")
    values["nnodes"] = f"{lo}:{hi}"
    values["rdzv.endpoint"] = _join(host, port)
    values["rdzv.id"] = _run_id(args.rdzv_id, notes)
    _apply_conf(args, choice, values, notes)
    return choice


def _apply_conf(args: TorchrunArgs, choice: str, values: dict[str, Any], notes: list[str]) -> None:
    conf = _parse_rdzv_conf(args.rdzv_conf)
    known = _CONF_KEYS.get(choice, _CONF_KEYS["tcp"])
    ignored = []
    for key, text in conf.items():
        if key in known:
            name, kind = known[key]
            values[f"rdzv.{name}"] = _conf_value(key, text, kind)
        elif key != "keep_alive_max_attempt" or "keep_alive_interval" not in known:
            ignored.append(key)
    # torch's keep-alive: a node is dead after keep_alive_max_attempt (3) missed beats
    keep_alive = {"keep_alive_interval", "keep_alive_max_attempt"} & conf.keys()
    if keep_alive and "keep_alive_interval" in known and "heartbeat_timeout" not in conf:
        interval = values.get("rdzv.heartbeat_interval", 5.0)
        attempts = _conf_value(
            "keep_alive_max_attempt", conf.get("keep_alive_max_attempt", "3"), float
        )
        values["rdzv.heartbeat_timeout"] = interval * max(attempts, 1.0)
    if ignored:
        reason = "" if set(ignored) <= _CONF_IGNORED else " (unknown here)"
        notes.append(f"--rdzv-conf: {', '.join(ignored)} ignored{reason}")


def _job(args: TorchrunArgs, values: dict[str, Any], notes: list[str]) -> None:
    script, script_args = args.training_script, list(args.training_script_args)
    if args.run_path:  # runpy in a Python worker: the same as python -u script
        values.update({"job.entrypoint": script, "job.python": True})
    elif args.no_python:
        if args.module:
            raise TorchrunUsageError(
                "don't use both the '--no-python' flag and the '--module' flag at the same time"
            )
        values.update({"job.entrypoint": script, "job.python": False})
    elif args.module:
        values["job.module"] = script
    else:
        values.update({"job.entrypoint": script, "job.python": True})
    values["job.args"] = [_worker_arg(arg, notes) for arg in script_args]


#: Stands for the local rank while an argument is read as torch reads it.
_RANK = "\0"


def _worker_arg(arg: str, notes: list[str]) -> str:
    """A script argument as torch's agent passes it: a ``string.Template`` given the
    local rank (``${local_rank}`` and ``$local_rank`` are the rank, ``$$`` is ``$``,
    any other ``$`` stays), in elastic-run's placeholder ``${local_rank}``."""
    if "$" not in arg and "%local_rank%" not in arg:
        return arg
    torch_form = string.Template(arg).safe_substitute(local_rank=_RANK)
    if any(p in torch_form for p in LOCAL_RANK_PLACEHOLDERS):
        notes.append(
            f"argument {arg!r}: elastic-run replaces {' and '.join(LOCAL_RANK_PLACEHOLDERS)} "
            "in it by the local rank, torchrun would not"
        )
    return torch_form.replace(_RANK, "${local_rank}")


def translate(
    args: TorchrunArgs, environ: Mapping[str, str], *, backends: Collection[str] = ()
) -> Translation:
    """Map a parsed torchrun command line (and the variables torchrun's agent reads from
    ``environ``) onto elastic-run's configuration. ``backends`` names the rendezvous
    backends installed (plugins' too). Raises :class:`TorchrunUsageError` (one line)."""
    notes: list[str] = []
    values: dict[str, Any] = {}
    lo, hi = _parse_nnodes(args.nnodes)
    if args.max_restarts < 0:
        raise TorchrunUsageError(f"--max-restarts={args.max_restarts}: expected >= 0")
    nproc = args.nproc_per_node.strip()
    values["job.nproc_per_node"] = int(nproc) if nproc.lstrip("-").isdigit() else nproc
    values["nnodes"] = f"{lo}:{hi}" if lo != hi else str(hi)
    rdzv = _rendezvous(args, lo, hi, backends, values, notes)
    if rdzv == "local":
        values["nnodes"] = "1"
    values["max_restarts"] = args.max_restarts
    values["job.role"] = args.role
    if args.local_addr is not None:
        values["rdzv.local_addr"] = args.local_addr
    _job(args, values, notes)
    console_values(args, values, notes)
    template = environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE")
    if template:
        values["logs.prefix"] = log_prefix_from_template(template)
    names = [s.strip() for s in args.signals_to_handle.split(",") if s.strip()]
    if unknown := [s for s in names if not hasattr(signal, s)]:  # torch: a warning each
        notes.append(f"--signals-to-handle: {', '.join(unknown)} ignored (no such signal)")
    values["signals.forward"] = [s for s in names if s not in unknown]
    timeout: int | str | None = args.shutdown_timeout
    if timeout is None and (text := environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "").strip()):
        try:
            timeout = int(text)
        except ValueError:
            raise TorchrunUsageError(
                f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={text!r}: expected a whole number of seconds"
            ) from None
    if timeout is not None:
        if int(timeout) < 0:
            raise TorchrunUsageError(f"--shutdown-timeout={timeout}: expected >= 0")
        values["stop_timeout"] = float(timeout)
    overrides = [f"rdzv={rdzv}"]
    if args.log_dir:  # torch takes "" as none: a temporary directory
        overrides.append(_run_dir_override(args.log_dir, values.get("rdzv.id")))
    set_ignored = [
        f"--{dest.replace('_', '-')}"
        for dest in IGNORED_OPTIONS
        if dest in args.given and getattr(args, dest) not in (False, None, [])
    ]
    if set_ignored:
        notes.append(f"{', '.join(set_ignored)}: no effect under elastic-run")
    return Translation(tuple(overrides), values, tuple(notes))


def _run_dir_override(log_dir: str, run_id: object) -> str:
    """``--log-dir D``: torch logs under ``D/<run id>_<random>/attempt_<n>/<local rank>``;
    the run directory is that ``D/<run id>_<random>``, quoted for Hydra's grammar."""
    if "${" in log_dir or "\n" in log_dir or "\0" in log_dir:
        raise TorchrunUsageError(f"--log-dir={log_dir!r}: '${{', newlines and NUL are not allowed")
    path = posixpath.join(log_dir, f"{run_id or 'run'}_{secrets.token_hex(4)}")
    return f"hydra.run.dir={hydra_quoted(path)}"


def hydra_quoted(text: str) -> str:
    """``text`` as a quoted value of Hydra's override grammar: each quote escaped, and
    each backslash before a quote or at the end doubled (Hydra reads ``2n`` backslashes
    there as ``n``)."""

    def escape(m: re.Match[str]) -> str:
        return m.group(1) * 2 + ("\\'" if m.group(2) else "")

    return "'" + re.sub(r"(\\*)('|\Z)", escape, text) + "'"
