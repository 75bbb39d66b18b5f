"""The golden table of the torchrun front end: for each torchrun command line and
environment, what torch 2.13 decides against what ``elastic-run torchrun`` decides.

torch's side is torch's own code: ``torch.distributed.run.parse_args`` (the ``PET_*``
fallbacks included), ``run`` (standalone, auto-standalone, ``master_port`` 29500) with
``elastic_launch`` replaced by a recorder, ``config_from_args``, then what its rendezvous
handler reads from that config before it connects anywhere (the endpoint, the
``--rdzv-conf`` values, through torch's ``parse_rendezvous_endpoint`` and
``RendezvousParameters``), its log specs' ``reify`` (which local rank's streams reach the
console, where the run's log directory is) and ``macros.substitute`` (each worker's argv).

Our side is the path ``elastic-run torchrun`` takes: ``prepare``, Hydra's compose API with
the overrides it returns, ``ConfigPatch.apply``, ``OmegaConf.to_object``, ``validate``,
the store backends' ``settings_from`` and ``resolve_command``.

``expected`` maps torch's decision onto elastic-run's configuration by the rules of
``elastic_runner/torchrun/translate.py``'s docstring (one node runs ``rdzv=local``;
``c10d`` is ``tcp``; ``static`` across nodes has its store on ``master_port + 1``; ...),
so every generated row is compared field by field. Rows: launchers' real lines
(torchtitan, TorchX, Slurm recipes, SkyPilot, JobSet, Kubeflow) crossed with both
spellings, ``--opt=value`` and ``--opt value``, ``PET_*`` instead of options, ``PET_*``
losing to options, and argparse's abbreviations; bad input that both refuse; input torch
crashes on that we accept; input we refuse that torch takes; deliberate differences; and
random lines (hypothesis).

Run by ``nox -s integration`` / ``.ci/run`` (torch==2.13.0); skipped without torch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import posixpath
import re
import shlex
import shutil
import signal
import string
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("hypothesis")
pytestmark = pytest.mark.integration

import torch.distributed.run as torch_run  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from torch.distributed.elastic.rendezvous.api import RendezvousParameters  # noqa: E402
from torch.distributed.elastic.rendezvous.utils import (  # noqa: E402
    _parse_rendezvous_config,
    parse_rendezvous_endpoint,
)
from torch.distributed.elastic.utils import macros  # noqa: E402

from elastic_runner.config import (  # noqa: E402
    ConfigError,
    ElasticRunConfig,
    describe_config_error,
    register_configs,
    validate,
)
from elastic_runner.plugins import load_plugins  # noqa: E402
from elastic_runner.registry import ComponentKind  # noqa: E402
from elastic_runner.rendezvous.kit import StoreRendezvousConfig, settings_from  # noqa: E402
from elastic_runner.resources import conf_dir  # noqa: E402
from elastic_runner.spec import RunContext, WorkerSpec  # noqa: E402
from elastic_runner.torchrun.front import prepare  # noqa: E402
from elastic_runner.torchrun.options import TorchrunUsageError  # noqa: E402
from elastic_runner.workers.command import resolve_command  # noqa: E402

PLUGINS = load_plugins()
BACKENDS = PLUGINS.registry.names(ComponentKind.RENDEZVOUS)

#: Files every line may name, made in the test's working directory.
SCRIPTS = ("train.py", "main.py", "resnet.py", "echo.py", "my train.py", "ünï.py")
EXECUTABLE = "run.sh"

#: What the test clears before each line: every variable torch's run.py reads.
CLEARED = (
    "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE",
    "TORCH_ELASTIC_SHUTDOWN_TIMEOUT",
    "ELASTIC_RUN_OVERRIDES",
    "PYTHON_EXEC",
    "OMP_NUM_THREADS",  # torch's config_from_args sets it in os.environ
)

#: A global rank to format log prefixes with: local rank r is SAMPLE_RANK + r.
SAMPLE_RANK = 10

TORCH_FAILURES = (SystemExit, ValueError, RuntimeError, AssertionError, TypeError)
OUR_FAILURES = (TorchrunUsageError, ConfigError, OmegaConfBaseException, HydraException)


# -- a torchrun command line ----------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """torchrun's options, the script (or ``-m``'s module) with its arguments, and the
    environment of the agent."""

    options: tuple[str, ...]
    script: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    @property
    def argv(self) -> list[str]:
        return [*self.options, *self.script]

    def with_env(self, **env: str | None) -> Line:
        merged = {**dict(self.env), **env}
        return dataclasses.replace(
            self, env=tuple(sorted((k, v) for k, v in merged.items() if v is not None))
        )

    def __str__(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env)
        return f"{env} torchrun {shlex.join(self.argv)}".strip()


def line(options: str, script: str, **env: str) -> Line:
    return Line(tuple(shlex.split(options)), tuple(shlex.split(script)), tuple(sorted(env.items())))


# -- torch's side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchRun:
    """What torch's torchrun made of a line, up to ``elastic_launch(config, cmd)(*args)``."""

    parsed: Any  # the namespace parse_args returned
    config: Any  # LaunchConfig
    cmd: Any  # the entrypoint: a program, or run_script_path
    cmd_args: list[str]


def torch_decides(line: Line, monkeypatch: pytest.MonkeyPatch) -> TorchRun:
    """torch's ``parse_args`` and ``run`` on the line, nothing launched. The environment
    is the line's (torch reads ``PET_*`` when it builds its parser)."""
    recorded: dict[str, Any] = {}

    def launch(config: Any, entrypoint: Any) -> Callable[..., None]:
        recorded.update(config=config, entrypoint=entrypoint)
        return lambda *args: recorded.update(args=list(args))

    monkeypatch.setattr(torch_run, "elastic_launch", launch)
    monkeypatch.setattr(torch_run.torch.multiprocessing, "_set_thread_name", lambda name: None)
    parsed = torch_run.parse_args(line.argv)
    torch_run.run(copy.copy(parsed))  # run() rewrites its namespace: standalone, ports
    return TorchRun(parsed, recorded["config"], recorded["entrypoint"], recorded["args"])


def _handler_reads(params: Any) -> tuple[str, int]:
    """What torch 2.13's rendezvous handler for ``params`` reads before it connects
    anywhere (``rendezvous/registry.py`` and the backends' ``create_*``), failing on the
    same values: returns the endpoint's host and port."""
    backend = params.backend
    if backend == "static":  # static_tcp_rendezvous.create_rdzv_handler
        endpoint = params.endpoint.strip()
        if not endpoint:
            raise ValueError("endpoint is absent in RendezvousParameters")
        host, port = parse_rendezvous_endpoint(endpoint, -1)
        if port == -1:
            raise ValueError(f"Port is absent in endpoint: {endpoint}")
        int(params.config["timeout"])
        return host, port
    if backend in ("c10d", "etcd-v2"):  # create_backend, then dynamic's create_handler
        host, port = parse_rendezvous_endpoint(
            params.endpoint, 29400 if backend == "c10d" else 2379
        )
        if backend == "c10d":
            params.get_as_bool("is_host")
        for key in ("join", "last_call", "close", "heartbeat"):
            params.get_as_int(f"{key}_timeout")
        params.get_as_int("keep_alive_interval", 5)
        params.get_as_int("keep_alive_max_attempt", 3)
        return host, port
    if backend == "etcd":  # etcd_rendezvous.create_rdzv_handler
        host, port = parse_rendezvous_endpoint(params.endpoint, 2379)
        params.get_as_int("timeout", 600)
        params.get_as_int("last_call_timeout", 30)
        return host, port
    raise ValueError(f"The rendezvous backend '{backend}' is not registered.")


# -- what the two sides decide, in one shape -------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Everything the golden table compares."""

    backend: str
    nodes: tuple[int, int]
    nproc: int
    #: None: a fresh id per run (torch: a uuid4).
    run_id: str | None
    endpoint: str | None
    node_rank: int | None
    #: MASTER_ADDR and MASTER_PORT pinned for every worker.
    master: tuple[str | None, int | None]
    conf: tuple[tuple[str, object], ...]
    local_addr: str | None
    max_restarts: int
    role: str
    #: (job.entrypoint, job.module, job.python)
    job: tuple[str | None, str | None, bool | None]
    #: Each local rank's argv.
    workers: tuple[tuple[str, ...], ...]
    #: Each local rank's streams that reach the console.
    console: tuple[frozenset[str], ...]
    #: Each local rank's console line prefix (global rank SAMPLE_RANK + local rank).
    prefixes: tuple[str, ...]
    #: The run's log directory: its parent (absolute) and its name up to the random part.
    run_dir: tuple[str, str] | None
    signals: tuple[str, ...]
    stop_timeout: float


#: torch's backend names -> elastic-run's.
BACKEND_NAMES = {"c10d": "tcp", "etcd": "etcd", "etcd-v2": "etcd", "static": "static"}

#: ``--rdzv-conf`` keys -> ``rdzv.*`` keys, per elastic-run backend (translate.py).
CONF_KEYS: Mapping[str, Mapping[str, str]] = {
    "tcp": {
        "join_timeout": "join_timeout",
        "last_call_timeout": "last_call_timeout",
        "close_timeout": "close_timeout",
        "heartbeat_timeout": "heartbeat_timeout",
        "is_host": "is_host",
        "keep_alive_interval": "heartbeat_interval",
    },
    "static": {"timeout": "join_timeout"},
    "etcd": {
        "timeout": "join_timeout",
        "join_timeout": "join_timeout",
        "last_call_timeout": "last_call_timeout",
        "heartbeat_timeout": "heartbeat_timeout",
        "keep_alive_interval": "heartbeat_interval",
        "cacert": "ca_cert",
        "ca_cert": "ca_cert",
        "cert": "cert",
        "ssl_cert": "cert",
        "key": "key",
        "ssl_cert_key": "key",
    },
}
CONF_FIELDS = (
    "join_timeout",
    "last_call_timeout",
    "close_timeout",
    "heartbeat_timeout",
    "heartbeat_interval",
    "is_host",
    "ca_cert",
    "cert",
    "key",
)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _run_id(text: str) -> str:
    """An id elastic-run takes (``[A-Za-z0-9._-]``, a letter or digit first, at most 128)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:128]
    return cleaned if cleaned[:1].isalnum() else f"r{cleaned}"[:128]


def _expected_conf(backend: str, user: Mapping[str, str], params: Any) -> dict[str, object]:
    keys = CONF_KEYS[backend]
    conf: dict[str, object] = {}
    for key in user:
        if key not in keys:
            continue
        if key == "is_host":
            conf[keys[key]] = params.get_as_bool(key)
        elif keys[key] in ("ca_cert", "cert", "key"):
            conf[keys[key]] = user[key]
        else:
            conf[keys[key]] = float(params.get_as_int(key))
    keep_alive = {"keep_alive_interval", "keep_alive_max_attempt"} & user.keys()
    if keep_alive and "keep_alive_interval" in keys and "heartbeat_timeout" not in user:
        interval = params.get_as_int("keep_alive_interval", 5)
        conf["heartbeat_timeout"] = float(
            interval * max(params.get_as_int("keep_alive_max_attempt", 3), 1)
        )
    return conf


def expected(run: TorchRun) -> Decision:
    """elastic-run's decision for a line, from torch's by translate.py's rules. Raises
    where torch's launch would fail before starting a worker."""
    c, parsed = run.config, run.parsed
    user_conf = _parse_rendezvous_config(parsed.rdzv_conf)
    params = RendezvousParameters(
        c.rdzv_backend,
        c.rdzv_endpoint,
        c.run_id,
        c.min_nodes,
        c.max_nodes,
        c.local_addr,
        **c.rdzv_configs,
    )
    host, port = _handler_reads(params)
    fresh = c.run_id != parsed.rdzv_id  # --standalone or torch's auto-standalone: a uuid
    local = fresh or c.max_nodes == 1  # one node needs no store
    name = BACKEND_NAMES[c.rdzv_backend]
    backend = "local" if local else name
    nodes = {"local": (1, 1), "static": (c.max_nodes, c.max_nodes)}.get(
        backend, (c.min_nodes, c.max_nodes)
    )
    run_id = None if fresh else _run_id(c.run_id)
    static = name == "static" and not fresh
    endpoint = None if local else _join(host, port + 1 if static else port)

    # each local rank's argv, as torch's agent builds it
    cmd_args = list(run.cmd_args)
    if run.cmd is torch_run.run_script_path:  # --run-path: runpy in a python worker
        cmd, cmd_args = sys.executable, ["-u", *cmd_args]
    else:
        cmd = run.cmd
    if parsed.no_python and not parsed.run_path:
        program = run.cmd if "/" in run.cmd else shutil.which(run.cmd)
        assert program is not None, run.cmd
        cmd = os.path.abspath(program)
    elif not parsed.module:
        at = cmd_args.index(parsed.training_script)
        cmd_args[at] = str(Path(parsed.training_script).resolve())
    workers = tuple((cmd, *macros.substitute(cmd_args, str(r))) for r in range(c.nproc_per_node))
    if parsed.run_path or not (parsed.no_python or parsed.module):
        job: tuple[str | None, str | None, bool | None] = (parsed.training_script, None, True)
    elif parsed.no_python:
        job = (parsed.training_script, None, False)
    else:
        job = (None, parsed.training_script, None)

    # the console, per local rank, as torch's log specs decide it
    specs = c.logs_specs
    envs = {
        r: {"TORCHELASTIC_RUN_ID": c.run_id, "TORCHELASTIC_RESTART_COUNT": "0"}
        for r in range(c.nproc_per_node)
    }
    dest = specs.reify(envs)
    shown = [
        frozenset(
            s
            for s, streams, tees in (
                ("stdout", dest.stdouts, dest.tee_stdouts),
                ("stderr", dest.stderrs, dest.tee_stderrs),
            )
            if streams[r] == "" or r in tees
        )
        for r in range(c.nproc_per_node)
    ]
    union = frozenset().union(*shown)
    run_dir = None
    if parsed.log_dir:
        parent = os.path.dirname(os.path.abspath(specs._run_log_dir))
        run_dir = (parent, f"{run_id or 'run'}_")

    template = c.log_line_prefix_template
    prefixes = tuple(
        string.Template(template).safe_substitute(
            role_name=c.role, rank=SAMPLE_RANK + r, local_rank=r
        )
        if template
        else f"[{c.role}{r}]:"
        for r in range(c.nproc_per_node)
    )
    names = [s.strip() for s in c.signals_to_handle.split(",")]
    return Decision(
        backend=backend,
        nodes=nodes,
        nproc=c.nproc_per_node,
        run_id=run_id,
        endpoint=endpoint,
        node_rank=c.rdzv_configs["rank"] if static and not local else None,
        master=(host, port) if static else (None, None),
        conf=tuple(sorted(_expected_conf(name, user_conf, params).items())) if not local else (),
        local_addr=c.local_addr,
        max_restarts=c.max_restarts,
        role=c.role,
        job=job,
        workers=workers,
        # a rank shows all that any rank shows, or nothing (translate.py: _console)
        console=tuple(union if s else frozenset() for s in shown),
        prefixes=prefixes,
        run_dir=run_dir,
        signals=tuple(n for n in names if hasattr(signal, n)),  # torch warns for others
        stop_timeout=float(c.shutdown_timeout),
    )


# -- our side --------------------------------------------------------------------------------

Compose = Callable[[list[str]], DictConfig]


@pytest.fixture(scope="module")
def compose_config() -> Iterator[Compose]:
    """Hydra's compose API on elastic-run's config, as ``cli.main`` registers it; each
    distinct override list is composed once (a copy each time: the patch changes it)."""
    register_configs(PLUGINS.registry)
    composed: dict[tuple[str, ...], DictConfig] = {}

    def compose_copy(overrides: list[str]) -> DictConfig:
        key = tuple(overrides)
        if key not in composed:
            composed[key] = compose("config", overrides=overrides)
        return copy.deepcopy(composed[key])

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield compose_copy


def run_dir_of(overrides: Sequence[str]) -> str | None:
    """``hydra.run.dir`` as Hydra's override grammar reads it from the overrides."""
    parsed = OverridesParser.create().parse_overrides(
        [o for o in overrides if o.startswith("hydra.")]
    )
    found = [o.value() for o in parsed if o.key_or_group == "hydra.run.dir"]
    return str(found[-1]) if found else None


def ours(line: Line, compose_config: Compose) -> Decision:
    """What ``elastic-run torchrun`` decides for the line (the environment is the
    line's, set in os.environ), up to each worker's argv."""
    environ = dict(os.environ)
    overrides, patch = prepare([], line.argv, environ, backends=BACKENDS)
    cfg = compose_config([o for o in overrides if not o.startswith("hydra.")])
    run_dir = None
    if (path := run_dir_of(overrides)) is not None:
        name = os.path.basename(path)
        assert re.fullmatch(r".+_[0-9a-f]{8}", name), path
        run_dir = (os.path.dirname(os.path.abspath(path)), name[:-8])
    patch.apply(cfg)
    conf = OmegaConf.to_object(cfg)
    assert isinstance(conf, ElasticRunConfig)
    valid = validate(conf)
    rdzv = conf.rdzv
    if isinstance(rdzv, StoreRendezvousConfig):  # what the backend's factory checks
        settings_from(
            rdzv,
            RunContext(rdzv.id or "golden", Path("."), "node", valid.min_nodes, valid.max_nodes),
            node_rank=getattr(rdzv, "node_rank", None),
            close_timeout=getattr(rdzv, "close_timeout", None),
        )
    job = conf.job
    command = resolve_command(job.entrypoint, job.module, job.args, python=job.python, env=environ)
    spec = WorkerSpec(job.role, valid.nproc_per_node, command)
    defaults = {f.name: f.default for f in dataclasses.fields(type(rdzv))}
    observed = {
        k: getattr(rdzv, k)
        for k in CONF_FIELDS
        if hasattr(rdzv, k) and getattr(rdzv, k) != defaults[k]
    }
    local_addr = getattr(rdzv, "local_addr", None)
    shown = frozenset(conf.logs.console_streams)
    ranks = conf.logs.console_local_ranks
    return Decision(
        backend=rdzv.backend,
        nodes=(valid.min_nodes, valid.max_nodes),
        nproc=valid.nproc_per_node,
        run_id=rdzv.id or None,
        endpoint=getattr(rdzv, "endpoint", None),
        node_rank=getattr(rdzv, "node_rank", None),
        master=(rdzv.master_addr, rdzv.master_port),
        conf=tuple(sorted(observed.items())),
        local_addr=None if local_addr == defaults.get("local_addr") else local_addr,
        max_restarts=conf.max_restarts,
        role=job.role,
        job=(job.entrypoint, job.module, job.python),
        workers=tuple(tuple(spec.argv_for(r)) for r in range(valid.nproc_per_node)),
        console=tuple(
            shown if ranks is None or r in ranks else frozenset()
            for r in range(valid.nproc_per_node)
        ),
        prefixes=tuple(
            conf.logs.prefix.format(role=job.role, rank=SAMPLE_RANK + r, local_rank=r, node="n")
            for r in range(valid.nproc_per_node)
        ),
        run_dir=run_dir,
        signals=tuple(conf.signals.forward),
        stop_timeout=conf.stop_timeout,
    )


def our_failure(line: Line, compose_config: Compose) -> str | None:
    """The one line elastic-run stops with (exit 2), or None when the line is good."""
    try:
        ours(line, compose_config)
    except ConfigError as exc:
        return describe_config_error(exc)
    except OUR_FAILURES as exc:
        return str(exc)
    return None


# -- the working directory and environment of each row ---------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding the scripts the lines name, as the current directory; no
    ``PET_*`` or other variable torch's run.py reads is set; torch's temporary log
    directories go under it."""
    for name in SCRIPTS:
        (tmp_path / name).write_text("print('hello')\n")
    (tmp_path / EXECUTABLE).write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / EXECUTABLE).chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    for name in [n for n in os.environ if n.startswith("PET_")] + list(CLEARED):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def set_env(line: Line, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in line.env:
        monkeypatch.setenv(name, value)


# -- the table --------------------------------------------------------------------------------

#: Launchers' lines (torchtitan, TorchX, Slurm, SkyPilot, Kubeflow ...), and lines for each
#: option that matters.
BASES: dict[str, Line] = {
    # Kubeflow Trainer v2: bare torchrun, everything in PET_* (static rendezvous)
    "kubeflow-v2": line(
        "",
        "train.py",
        PET_NNODES="2",
        PET_NPROC_PER_NODE="auto",
        PET_NODE_RANK="1",
        PET_MASTER_ADDR="trainjob-node-0-0.trainjob",
        PET_MASTER_PORT="29500",
    ),
    "kubeflow-v2-one-node": line(
        "",
        "train.py --epochs 3",
        PET_NNODES="1",
        PET_NPROC_PER_NODE="2",
        PET_NODE_RANK="0",
        PET_MASTER_ADDR="tj-node-0-0.tj",
        PET_MASTER_PORT="29500",
    ),
    # training-operator v1.9 PyTorchJob (WORLD_SIZE/RANK are the pod's, ignored by both)
    "kubeflow-v1": line(
        "",
        "train.py --backend gloo",
        PET_MASTER_ADDR="job-master-0",
        PET_MASTER_PORT="23456",
        PET_NODE_RANK="2",
        PET_NNODES="3",
        PET_NPROC_PER_NODE="2",
        WORLD_SIZE="6",
        RANK="4",
        PYTHONUNBUFFERED="1",
    ),
    "kubeflow-v1-elastic": line(
        "--rdzv_backend=c10d",
        "./echo.py",
        PET_RDZV_ENDPOINT="job-worker-0:23456",
        PET_NNODES="1:4",
        PET_MAX_RESTARTS="3",
        PET_NPROC_PER_NODE="1",
        PET_RDZV_ID="job",
        PET_RDZV_CONF="join_timeout=900,last_call_timeout=15",
    ),
    "kubeflow-v1-etcd": line(
        "",
        "echo.py",
        PET_RDZV_BACKEND="etcd",
        PET_RDZV_ENDPOINT="etcd-service:2379",
        PET_NNODES="2:3",
        PET_RDZV_ID="etcd-job",
        PET_RDZV_CONF="timeout=300,last_call_timeout=20",
    ),
    # TorchX dist.ddp: --role '' and --tee 3; localhost:0 on one node
    "torchx-ddp": line(
        "--rdzv_backend c10d --rdzv_endpoint node0.app:29500 --rdzv_id app-x1y2 --nnodes 2 "
        "--nproc_per_node 2 --tee 3 --role '' --node_rank 1",
        "main.py --lr 0.1 '--name=a b'",
    ),
    "torchx-ddp-one-node": line(
        "--rdzv_backend c10d --rdzv_endpoint localhost:0 --rdzv_id app-1 --nnodes 1 "
        "--nproc_per_node 2 --tee 3 --role '' -m",
        "pkg.train --epochs=2",
    ),
    "skypilot": line(
        "--nnodes=2 --nproc_per_node=1 --node_rank=1 --master_addr=10.0.0.5 --master_port=8008",
        "main.py",
    ),
    "jobset": line(
        "--nproc_per_node=1 --master_addr=pytorch-workers-0-0.pytorch-workers --master_port=3389",
        "resnet.py --epochs 1",
    ),
    "torchtitan": line(
        "--nproc_per_node=2 --rdzv_backend c10d --rdzv_endpoint=localhost:0 "
        "--local-ranks-filter 0 --role rank --tee 3 -m",
        "torchtitan.train --job.config_file ./train_configs/debug_model.toml",
    ),
    "torchtitan-slurm": line(
        "--nnodes 4 --nproc_per_node 8 --rdzv_id 101 --rdzv_backend c10d "
        "--rdzv_endpoint 10.1.2.3:29500 -m",
        "torchtitan.train --job.config_file x.toml",
    ),
    "stas00-slurm": line(
        "--nproc_per_node 8 --nnodes 2 --rdzv_endpoint node-a:6000 --rdzv_backend c10d "
        "--max_restarts 0 --role node-a: --tee 3",
        "train.py --deepspeed ds_config.json",
    ),
    "ft-launcher": line(
        "--nnodes 2:4 --nproc-per-node 2 --rdzv-backend c10d --rdzv-id 5150 "
        "--rdzv-endpoint head:29400 --rdzv-conf "
        "join_timeout=1200,last_call_timeout=60,close_timeout=30,keep_alive_interval=10 "
        "--max-restarts 7",
        "train.py --ft-param-rank_section_timeouts=setup:600",
    ),
    "dlrover-static": line("--nnodes=1:3 --nproc_per_node=2 --max_restarts=3", "train.py"),
    "slurm-signals": line(
        "--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node001 "
        "--rdzv-id 4242 --signals-to-handle SIGTERM,SIGUSR1,SIGUSR2 --shutdown-timeout 60",
        "train.py",
    ),
    "standalone": line(
        "--standalone --nproc-per-node=4 --max-restarts=2",
        "train.py --data /data/x 'arg with spaces' '${local_rank}' --nproc-per-node 9 ünï --x=1 -m",
    ),
    "auto-standalone": line("--nproc-per-node 2 --rdzv-id ignored", "'my train.py' -- --a"),
    "bare": line("", "train.py"),
    "log-dir": line("--nproc_per_node 2 --log-dir logs -r 3 -t 1", "ünï.py"),
    "log-dir-static": line(
        "--nnodes 2 --master-port 29600 --rdzv-id exp.1 --log-dir out/'it s' --redirects 2",
        "train.py",
    ),
    "per-rank-redirects": line(
        "--nproc-per-node 3 --redirects 0:3,1:1 --tee 1:1", "train.py --seed 1"
    ),
    "per-rank-tee-nproc-word": line("--nproc-per-node cpu -r 3 -t 1:1", "train.py"),
    "local-ranks-filter": line(
        "--nproc-per-node 4 --local-ranks-filter 2,0 --tee 2 -r 2", "train.py"
    ),
    "no-python": line("--no-python --nproc-per-node 2", "bash -c 'echo $RANK' --x=1"),
    "no-python-path": line("--no_python", "./run.sh --flag"),
    "run-path": line("--run-path --nproc-per-node 2", "train.py --resume"),
    "ipv6-c10d": line(
        "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint [fd00::5]:29400 --rdzv-id v6",
        "train.py",
    ),
    "ipv6-static": line(
        "--nnodes 2 --node-rank 1 --master-addr [fd00::5] --master-port 29500", "train.py"
    ),
    "etcd-v2": line(
        "--nnodes 2 --rdzv-backend etcd-v2 --rdzv-endpoint etcd:2379 --rdzv-id e2 "
        "--rdzv-conf timeout=300,keep_alive_max_attempt=4",
        "train.py",
    ),
    "local-addr": line(
        "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint head --local-addr 10.0.0.7 "
        "--rdzv-conf is_host=1,read_timeout=30",
        "train.py",
    ),
    "prefix-template": line(
        "--nproc-per-node 2 --role trainer --tee 3",
        "train.py",
        TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="[${role_name}-${rank}/${local_rank}] $$ ${x}:",
    ),
    "python-exec": line("--nproc-per-node 2", "train.py -u", PYTHON_EXEC="/usr/bin/python3"),
    "template-args": line(
        "--nproc-per-node 2", "train.py --rank=$local_rank '--cost=$$5' '${local_rank}x' '$HOME'"
    ),
    "rdzv-id-cleaned": line(
        "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:1 --rdzv-id 'team exp:1'", "train.py"
    ),
    "shutdown-env": line("--nproc-per-node 1", "train.py", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="45"),
    "static-one-node-endpoint": line("--rdzv-endpoint 127.0.0.1:29555 --node-rank 0", "train.py"),
    "signals-unknown": line("--signals-to-handle SIGTERM,SIGFOO,,SIGUSR1", "train.py"),
    "ignored-options": line(
        "--monitor-interval 1 --start-method fork --event-log-handler console "
        "--duplicate-stdout-filters a,,b --virtual-local-rank --numa-binding node",
        "train.py",
    ),
}

#: For each option's dest, a valid value other than the lines' (env that loses).
OTHER_VALUES = {
    "nnodes": "3",
    "nproc_per_node": "3",
    "rdzv_backend": "etcd",
    "rdzv_endpoint": "elsewhere:1234",
    "rdzv_id": "other",
    "rdzv_conf": "join_timeout=5",
    "max_restarts": "9",
    "monitor_interval": "2",
    "start_method": "forkserver",
    "event_log_handler": "null",
    "role": "other",
    "log_dir": "env-logs",
    "redirects": "1",
    "tee": "2",
    "local_ranks_filter": "1",
    "node_rank": "1",
    "master_addr": "10.9.9.9",
    "master_port": "1234",
    "local_addr": "10.8.8.8",
    "signals_to_handle": "SIGUSR2",
    "shutdown_timeout": "7",
    "duplicate_stdout_filters": "x",
}


@dataclass(frozen=True)
class _Option:
    flags: tuple[str, ...]
    dest: str
    flag: bool  # takes no value
    env: bool  # has a PET_* fallback


def _torch_options() -> dict[str, _Option]:
    """torch's option strings -> what they are, read from torch's own parser."""
    options = {}
    for action in torch_run.get_args_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        option = _Option(
            tuple(action.option_strings),
            action.dest,
            action.nargs == 0,
            type(action).__name__ in ("env", "check_env"),
        )
        for flag in option.flags:
            options[flag] = option
    return options


OPTIONS = _torch_options()


def _split(line: Line) -> list[tuple[str, str | None]]:
    """The line's options as (option string, value or None for a flag)."""
    out: list[tuple[str, str | None]] = []
    tokens = list(line.options)
    while tokens:
        token = tokens.pop(0)
        name, eq, value = token.partition("=")
        option = OPTIONS[name if eq else token]
        if option.flag:
            out.append((token, None))
        else:
            out.append((name, value) if eq else (token, tokens.pop(0)))
    return out


def _join_options(items: list[tuple[str, str | None]], joined: bool) -> tuple[str, ...]:
    tokens: list[str] = []
    for flag, value in items:
        if value is None:
            tokens.append(flag)
        elif joined and flag.startswith("--"):
            tokens.append(f"{flag}={value}")
        else:
            tokens += [flag, value]
    return tuple(tokens)


def _spelled(flag: str, sep: str) -> str:
    """``flag`` spelled with ``sep`` between its words, where torch takes that spelling."""
    if not flag.startswith("--"):
        return flag
    other = "--" + flag[2:].replace("-", sep).replace("_", sep)
    return other if other in OPTIONS else flag


def _abbreviated(flag: str) -> str:
    """The shortest prefix of a long option that names it alone (argparse takes it)."""
    if not flag.startswith("--"):
        return flag
    for n in range(4, len(flag)):
        if [s for s in OPTIONS if s.startswith(flag[:n])] == [flag]:
            return flag[:n]
    return flag


def variants(base: Line) -> dict[str, Line]:
    """The line as written, and the same line written differently."""
    items = _split(base)
    joined = all(
        "=" in t
        for t in base.options
        if t.startswith("--") and not OPTIONS[t.partition("=")[0]].flag
    )

    def rewritten(items: list[tuple[str, str | None]], joined: bool = joined) -> Line:
        return dataclasses.replace(base, options=_join_options(items, joined))

    out = {
        "as-written": base,
        "dashes": rewritten([(_spelled(f, "-"), v) for f, v in items]),
        "underscores": rewritten([(_spelled(f, "_"), v) for f, v in items]),
        "opt=value" if not joined else "opt-value": rewritten(items, not joined),
        "abbreviated": rewritten([(_abbreviated(f), v) for f, v in items]),
    }
    # every option with a PET_* fallback as PET_* (a flag as 1); "" would mean unset here
    in_env = {
        f"PET_{OPTIONS[f].dest.upper()}": "1" if v is None else v
        for f, v in items
        if OPTIONS[f].env and v != ""
    }
    if in_env:
        kept = [(f, v) for f, v in items if f"PET_{OPTIONS[f].dest.upper()}" not in in_env]
        out["pet-env"] = rewritten(kept).with_env(**in_env)
    losing = {
        f"PET_{OPTIONS[f].dest.upper()}": "0" if v is None else OTHER_VALUES[OPTIONS[f].dest]
        for f, v in items
        if OPTIONS[f].env
    }
    if losing:
        out["pet-env-loses"] = base.with_env(**losing)
    return out


def _table() -> list[Any]:
    rows, seen = [], set()
    for name, base in BASES.items():
        for how, row in variants(base).items():
            key = (tuple(row.argv), row.env)
            if key in seen:
                continue
            seen.add(key)
            rows.append(pytest.param(row, id=f"{name}-{how}"))
    return rows


ROWS = _table()


def test_the_table_has_enough_rows() -> None:
    assert len(ROWS) >= 80, len(ROWS)


@pytest.mark.parametrize("row", ROWS)
def test_golden_row(
    row: Line, workdir: Path, monkeypatch: pytest.MonkeyPatch, compose_config: Compose
) -> None:
    set_env(row, monkeypatch)
    want = expected(torch_decides(row, monkeypatch))
    got = ours(row, compose_config)
    assert got == want, f"{row}\n" + "\n".join(
        f"  {f.name}: ours {getattr(got, f.name)!r} != torch's {getattr(want, f.name)!r}"
        for f in dataclasses.fields(Decision)
        if getattr(got, f.name) != getattr(want, f.name)
    )


# -- bad input: torch stops, and so do we (exit 2, one line) ---------------------------------

BAD = {
    "no-script": line("--nproc-per-node 2", ""),
    "nnodes-three-parts": line("--nnodes 1:2:3", "train.py"),
    "nnodes-min-over-max": line("--nnodes 2:1", "train.py"),
    "nnodes-zero": line("--nnodes 0", "train.py"),
    "nnodes-word": line("--nnodes two", "train.py"),
    "max-restarts-negative": line("--max-restarts -1", "train.py"),
    "max-restarts-word": line("--max-restarts two", "train.py"),
    "pet-max-restarts-word": line("", "train.py", PET_MAX_RESTARTS="abc"),
    "pet-node-rank-word": line("--nnodes 2 --master-port 29500", "train.py", PET_NODE_RANK="x"),
    "rdzv-conf-no-value": line(
        "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:1 --rdzv-conf join_timeout", "train.py"
    ),
    "rdzv-conf-no-value-one-node": line("--rdzv-conf join_timeout=", "train.py"),
    "rdzv-conf-not-int": line(
        "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:1 --rdzv-conf join_timeout=soon",
        "train.py",
    ),
    "rdzv-conf-not-bool-standalone": line("--standalone --rdzv-conf is_host=maybe", "train.py"),
    "static-timeout-not-int": line(
        "--nnodes 2 --master-port 29500 --rdzv-conf timeout=1.5", "train.py"
    ),
    "redirects-4": line("-r 4", "train.py"),
    "tee-bad-mapping": line("--tee 0:5", "train.py"),
    "local-ranks-filter-word": line("--local-ranks-filter 0,a", "train.py"),
    "no-python-with-module": line("--no-python -m", "pkg.train"),
    "nproc-gpu-without-gpus": line("--nproc-per-node gpu", "train.py"),
    "nproc-word": line("--nproc-per-node eight", "train.py"),
    "start-method": line("--start-method thread", "train.py"),
    "numa-binding": line("--numa-binding everywhere", "train.py"),
    "shutdown-timeout-negative": line("--shutdown-timeout -5", "train.py"),
    "shutdown-env-word": line("", "train.py", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="soon"),
    "unknown-backend": line(
        "--nnodes 2 --rdzv-backend nosuch --rdzv-endpoint h:1 --rdzv-id x", "train.py"
    ),
    "endpoint-port-too-big": line(
        "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:99999", "train.py"
    ),
    "endpoint-port-word": line("--nnodes 2 --rdzv-backend etcd --rdzv-endpoint h:x", "train.py"),
    "endpoint-bad-host": line(
        "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 'bad host:29400'", "train.py"
    ),
    "static-endpoint-without-port": line("--nnodes 2 --rdzv-endpoint head", "train.py"),
    "static-master-port-too-big": line("--nnodes 2 --master-port 70000", "train.py"),
    "unknown-option": line("--bogus", "train.py"),
    "ambiguous-abbreviation": line("--max 3", "train.py"),
}


@pytest.mark.parametrize("row", [pytest.param(v, id=k) for k, v in BAD.items()])
def test_bad_input_fails_on_both_sides(
    row: Line,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    compose_config: Compose,
    capsys: pytest.CaptureFixture[str],
) -> None:
    set_env(row, monkeypatch)
    with pytest.raises(TORCH_FAILURES) as torch_error:
        expected(torch_decides(row, monkeypatch))
    if isinstance(torch_error.value, SystemExit):
        assert torch_error.value.code == 2  # argparse's error
    capsys.readouterr()
    failure = our_failure(row, compose_config)
    assert failure is not None, f"{row}: torch fails ({torch_error.value!r}), we accept it"
    assert failure.isprintable() and "\n" not in failure, failure


# -- input torch crashes on, that launchers send: we read it as the equivalent line ----------

LENIENT = {
    # Kubeflow's training-operator sets exactly this for a standalone elastic job
    "pet-standalone-empty": (
        line("", "train.py", PET_STANDALONE=""),
        line("--standalone", "train.py"),
    ),
    "pet-standalone-true": (
        line("--nproc-per-node 2", "train.py", PET_STANDALONE="true"),
        line("--standalone --nproc-per-node 2", "train.py"),
    ),
    "pet-nnodes-empty": (
        line("--nproc-per-node 2", "train.py", PET_NNODES=""),
        line("--nproc-per-node 2", "train.py"),
    ),
    "pet-max-restarts-empty": (
        line("", "train.py", PET_MAX_RESTARTS="", PET_NPROC_PER_NODE="2"),
        line("", "train.py", PET_NPROC_PER_NODE="2"),
    ),
    # torch's log directory is "<run id>_<random>": a "/" in the id fails its first start
    "rdzv-id-with-slash": (
        line("--nproc-per-node 2 --rdzv-backend c10d --rdzv-id team/exp", "train.py"),
        line("--nproc-per-node 2 --rdzv-backend c10d --rdzv-id team_exp", "train.py"),
    ),
    "pet-node-rank-blank": (
        line("--nnodes 2 --master-port 29500", "train.py", PET_NODE_RANK=" "),
        line("--nnodes 2 --master-port 29500", "train.py"),
    ),
}


@pytest.mark.parametrize(
    ("row", "equivalent"), [pytest.param(*v, id=k) for k, v in LENIENT.items()]
)
def test_input_torch_crashes_on_means_the_equivalent_line(
    row: Line,
    equivalent: Line,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    compose_config: Compose,
) -> None:
    with monkeypatch.context() as m:
        set_env(row, m)
        with pytest.raises((*TORCH_FAILURES, OSError)):
            expected(torch_decides(row, m))
        got = ours(row, compose_config)
    set_env(equivalent, monkeypatch)
    want = expected(torch_decides(equivalent, monkeypatch))
    if want.run_id is None:  # a fresh id on both sides
        assert got.run_id is None
    assert got == want


# -- deliberate differences (translate.py's docstring) ---------------------------------------


def _workers_with(placeholder: str) -> Callable[[Decision], Decision]:
    def change(d: Decision) -> Decision:
        return dataclasses.replace(
            d,
            workers=tuple(
                tuple(a.replace(placeholder, str(r)) for a in argv)
                for r, argv in enumerate(d.workers)
            ),
        )

    return change


DELIBERATE: dict[str, tuple[Line, Callable[[Decision], Decision]]] = {
    # torch cuts a bare IPv6 address at its last colon: host "fe80:", port 1
    "bare-ipv6-endpoint": (
        line("--nnodes 2 --rdzv-backend c10d --rdzv-endpoint fe80::1 --rdzv-id v6", "train.py"),
        lambda d: dataclasses.replace(d, endpoint="[fe80::1]:29400"),
    ),
    # an empty PET_* value counts as unset: TorchX's --role '' must be on the command line
    "pet-role-empty": (
        line("", "train.py", PET_ROLE=""),
        lambda d: dataclasses.replace(
            d, role="default", prefixes=tuple(p.replace("[", "[default", 1) for p in d.prefixes)
        ),
    ),
    # elastic-run's own placeholder is replaced too
    "percent-local-rank": (
        line("--nproc-per-node 2", "train.py --rank=%local_rank%"),
        _workers_with("%local_rank%"),
    ),
    "escaped-dollar-local-rank": (
        line("--nproc-per-node 2", "train.py '$${local_rank}'"),
        _workers_with("${local_rank}"),
    ),
}


@pytest.mark.parametrize(
    ("row", "difference"), [pytest.param(*v, id=k) for k, v in DELIBERATE.items()]
)
def test_deliberate_differences(
    row: Line,
    difference: Callable[[Decision], Decision],
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    compose_config: Compose,
) -> None:
    set_env(row, monkeypatch)
    torch_view = expected(torch_decides(row, monkeypatch))
    want = difference(torch_view)
    assert want != torch_view
    assert ours(row, compose_config) == want


# -- input we refuse (exit 2, one line) that torch takes -------------------------------------

REFUSED = {
    # torch starts no worker at all
    "nproc-zero": (line("--nproc-per-node 0", "train.py"), r"^job.nproc_per_node=0: "),
    # torch waits for a node rank that cannot come
    "static-node-rank-out-of-range": (
        line("--nnodes 2 --node-rank 2 --master-port 29500", "train.py"),
        r"^--node-rank=2: expected 0 to 1",
    ),
    "static-one-node-rank-1": (
        line("--node-rank 1 --master-port 29500", "train.py"),
        r"^--node-rank=1: expected 0 to 0",
    ),
    # port 0 is a fresh port per host: the other nodes cannot know it
    "c10d-port-0-across-nodes": (
        line("--nnodes 2 --rdzv-backend c10d --rdzv-endpoint localhost:0", "train.py"),
        r"port 0 picks a free port",
    ),
    # the agents' store listens on master_port + 1
    "static-master-port-65535": (
        line("--nnodes 2 --master-port 65535", "train.py"),
        r"^--master-port=65535: the agents' store listens on the next port",
    ),
    "static-port-0": (
        line("--nnodes 2 --rdzv-endpoint head:0", "train.py"),
        r"^rdzv.master_port=0: expected a port from 1 to 65535",
    ),
    "log-dir-interpolation": (line("--log-dir '${oc.env:HOME}'", "train.py"), r"^--log-dir="),
    # torch checks no choice of a PET_* value (multiprocessing fails at launch)
    "pet-start-method": (
        line("", "train.py", PET_START_METHOD="thread"),
        r"^PET_START_METHOD='thread': invalid choice",
    ),
    # only the signals elastic-run forwards
    "signal-not-forwarded": (
        line("--signals-to-handle SIGTERM,SIGALRM", "train.py"),
        r"^signals.forward=SIGALRM: allowed: ",
    ),
    "negative-timeout": (
        line(
            "--nnodes 2 --rdzv-backend c10d --rdzv-endpoint h:1 --rdzv-conf join_timeout=-5",
            "train.py",
        ),
        r"^rdzv.join_timeout=-5.0: expected seconds >= 0",
    ),
    "too-many-workers": (line("--nproc-per-node 100000", "train.py"), r"^job.nproc_per_node="),
}


@pytest.mark.parametrize(("row", "message"), [pytest.param(*v, id=k) for k, v in REFUSED.items()])
def test_input_we_refuse_though_torch_takes_it(
    row: Line, message: str, workdir: Path, monkeypatch: pytest.MonkeyPatch, compose_config: Compose
) -> None:
    set_env(row, monkeypatch)
    torch_decides(row, monkeypatch)  # no error
    failure = our_failure(row, compose_config)
    assert failure is not None and re.search(message, failure), failure
    assert failure.isprintable(), failure


# -- random lines ----------------------------------------------------------------------------

#: What elastic-run refuses where torch would start and hang or fail later (REFUSED).
REFUSALS = (
    r"^--node-rank=\d+: expected 0 to ",
    r"port 0 picks a free port",
    r"^job.nproc_per_node=",
    r"^rdzv.master_port=0: ",
)


@st.composite
def random_lines(draw: st.DrawFn) -> Line:
    def maybe(
        flags: Sequence[str], values: Sequence[str], always: bool = False
    ) -> list[tuple[str, str]]:
        if not always and not draw(st.booleans()):
            return []
        return [(draw(st.sampled_from(flags)), draw(st.sampled_from(values)))]

    items = [
        *maybe(["--nnodes"], ["1", "2", "1:2", "2:4", " 3"], always=True),
        # a word (auto, cpu) is counted after translation: per-rank redirects and tee are
        # exact only with a number (the table has a word with what it can express)
        *maybe(["--nproc-per-node", "--nproc_per_node"], ["1", "2", "3"]),
        *maybe(["--rdzv-backend", "--rdzv_backend"], ["c10d", "static", "etcd", "etcd-v2"]),
        *maybe(
            ["--rdzv-endpoint", "--rdzv_endpoint"],
            ["head:29400", "localhost:0", "[::1]:1234", "10.0.0.1", "h:5", "node-1.x:29500"],
        ),
        *maybe(["--rdzv-id", "--rdzv_id"], ["job1", "a b", "x:y", "none"]),
        *maybe(
            ["--rdzv-conf", "--rdzv_conf"],
            [
                "join_timeout=10",
                "is_host=0,last_call_timeout=5",
                "keep_alive_interval=2",
                "timeout=60",
                "close_timeout=3,heartbeat_timeout=40",
            ],
        ),
        *maybe(["--node-rank", "--node_rank"], ["0", "1", "3"]),
        *maybe(["--master-addr", "--master_addr"], ["10.1.1.1", "[::1]", "head"]),
        *maybe(["--master-port", "--master_port"], ["29500", "1234"]),
        *maybe(["-r", "--redirects"], ["0", "1", "2", "3", "0:3,1:1", "1:2"]),
        *maybe(["-t", "--tee"], ["0", "1", "3", "0:1"]),
        *maybe(["--local-ranks-filter", "--local_ranks_filter"], ["0", "1,0", "5"]),
        *maybe(["--max-restarts", "--max_restarts"], ["0", "3"]),
        *maybe(["--role"], ["trainer", "", "r:"]),
        *maybe(["--log-dir", "--log_dir"], ["logs", "a b/c"]),
    ]
    if draw(st.integers(0, 4)) == 0:
        items.append(("--standalone", ""))
    mode = draw(st.sampled_from(["script", "module", "no-python", "run-path"]))
    script = {
        "script": "train.py",
        "module": "pkg.mod",
        "no-python": "./run.sh",
        "run-path": "main.py",
    }[mode]
    flag = {"module": "-m", "no-python": "--no-python", "run-path": "--run-path"}.get(mode)
    if flag:
        items.append((flag, ""))
    args = draw(
        st.lists(st.text(alphabet="ab -=$%{}_lrcnok:ü", max_size=8), max_size=3).filter(
            lambda a: not any("%local_rank%" in x or "$${local_rank}" in x for x in a)
        )
    )
    options: list[str] = []
    env: dict[str, str] = {}
    for flag_, value in draw(st.permutations(items)):
        option = OPTIONS[flag_]
        how = draw(st.sampled_from(["flag", "flag=", "env"]))
        if how == "env" and option.env and (option.flag or value.strip()):
            env[f"PET_{option.dest.upper()}"] = "1" if option.flag else value
        elif option.flag:
            options.append(flag_)
        elif how == "flag=" and flag_.startswith("--"):
            options.append(f"{flag_}={value}")
        else:
            options += [flag_, value]
    return Line(tuple(options), (script, *args), tuple(sorted(env.items())))


@settings(
    max_examples=int(os.environ.get("ER_GOLDEN_EXAMPLES", "100")),
    deadline=None,
    derandomize="CI" in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(row=random_lines())
def test_random_lines_agree(row: Line, workdir: Path, compose_config: Compose) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        set_env(row, monkeypatch)
        try:
            want = expected(torch_decides(row, monkeypatch))
        except TORCH_FAILURES as exc:
            event("both refuse")
            assert our_failure(row, compose_config) is not None, f"{row}: torch: {exc!r}"
            return
        failure = our_failure(row, compose_config)
        if failure is not None:
            event("we refuse what torch takes")
            assert any(re.search(r, failure) for r in REFUSALS), f"{row}: {failure}"
            return
        event(f"compared: {want.backend}")
        got = ours(row, compose_config)
        if want.run_id is None:
            assert got.run_id is None
        assert got == want, str(row)


def test_log_dir_is_the_run_directory_parent(workdir: Path, compose_config: Compose) -> None:
    """``--log-dir`` with quotes, backslashes and spaces: the run directory is under it,
    exactly, as Hydra composes it."""
    log_dir = str(workdir / "it's \\ a \\'dir\\")
    row = Line(
        ("--log-dir", log_dir, "--rdzv-id", "r1", "--rdzv-endpoint", "127.0.0.1:1"), ("train.py",)
    )
    got = ours(row, compose_config)
    assert got.run_dir == (log_dir, "r1_")
    overrides, _ = prepare([], row.argv, {}, backends=BACKENDS)
    cfg = compose("config", overrides=overrides, return_hydra_config=True)
    run_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
    assert posixpath.dirname(run_dir) == log_dir
    assert re.fullmatch(r"r1_[0-9a-f]{8}", posixpath.basename(run_dir))
