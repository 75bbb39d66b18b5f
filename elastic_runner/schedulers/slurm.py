"""Slurm mode: ``srun elastic-run +job=X`` forms the job across the step's nodes.

Under ``srun`` (one task per node), each task is one agent, and the step's environment
says everything a rendezvous needs, so the command line needs no ``rdzv.*`` setting:

- detected when ``SLURM_JOB_ID`` and ``SLURM_STEP_ID`` are set (a step, not the batch
  script) and ``scheduler`` is ``auto`` (the default) or ``slurm`` (then required);
- nodes: ``SLURM_STEP_NUM_NODES`` (else ``SLURM_NNODES``); this node's rank:
  ``SLURM_NODEID``; the job's id: ``slurm-<SLURM_JOB_ID>.<SLURM_STEP_ID>``;
- the store: on the step's first node (the first host of ``SLURM_STEP_NODELIST``, else
  ``SLURM_JOB_NODELIST``, expanded here: no ``scontrol`` needed), hosted by node rank 0 on
  every interface, at :func:`store_port` of the job and step ids. Its address is the
  node's name when that resolves, else its ``NodeAddr`` from ``slurm.conf`` (``$SLURM_CONF``,
  else ``/etc/slurm/slurm.conf``), else what ``scontrol show node`` says;
- ``rdzv=static`` (fixed ``nnodes``), or ``rdzv=tcp`` with ``rdzv.is_host`` true on node
  rank 0 only when the command line says ``nnodes=MIN:MAX`` (so it stays elastic); a
  one-node step stays ``rdzv=local``;
- a step with several tasks on a node is an error: one agent per node starts the workers.

What the command line sets always wins: with ``rdzv=<backend>`` the rendezvous is the
user's and Slurm mode only fills ``nnodes``, ``rdzv.id`` (and, for ``static``,
``rdzv.node_rank``) when they are not on the command line (nothing at all for
``rdzv=local``); without it, every ``rdzv.*`` key on the command line keeps its value and
Slurm mode fills the others. :func:`detect` is a pure function of an environment and of
injectable readers (file, command, resolver); :func:`command_line` is the front door's
part.
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic_runner.config_patch import ConfigPatch

__all__ = [
    "DEFAULT_SLURM_CONF",
    "PORT_BASE",
    "PORT_SLOTS",
    "SCONTROL_TIMEOUT",
    "STEPS_PER_JOB",
    "CommandRunner",
    "FileReader",
    "Resolver",
    "SlurmError",
    "SlurmStep",
    "command_line",
    "detect",
    "expand_hostlist",
    "node_address",
    "parse_tasks_per_node",
    "plan",
    "scheduler_choice",
    "slurm_conf_addresses",
    "store_port",
]

DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"
#: Seconds ``scontrol show node`` may take (a slow controller must not stall the start).
SCONTROL_TIMEOUT = 5.0
#: The store's ports: ``PORT_BASE .. PORT_BASE + PORT_SLOTS - 1`` (20000..28191: below
#: torch's 29400/29500 and Linux's ephemeral ports, 32768 and up).
PORT_BASE = 20000
PORT_SLOTS = 8192
#: Steps of one job that get distinct ports (step ids 0..7, then again).
STEPS_PER_JOB = 8

#: Reads a text file (``Path.read_text`` by default); raises ``OSError``.
FileReader = Callable[[str], str]
#: Runs a command with a timeout in seconds and returns its stdout; raises ``OSError``
#: (not found, failed) or ``subprocess.SubprocessError`` (timed out, exit status).
CommandRunner = Callable[[Sequence[str], float], str]
#: Whether a host name resolves to an address.
Resolver = Callable[[str], bool]

#: Step ids Slurm gives what is not an ``srun`` step (batch script, extern, interactive).
_SPECIAL_STEPS = 0xFFFFFFF0


class SlurmError(Exception):
    """Slurm mode cannot decide: one line, exit 2 (no worker starts)."""


@dataclass(frozen=True)
class SlurmStep:
    """What Slurm mode decided from a job step's environment."""

    job_id: int
    step_id: int
    #: Nodes of the step, and this node's index among them.
    nnodes: int
    node_rank: int
    #: The step's first node (by name) and the address the others reach its store at.
    head: str
    head_address: str
    #: How ``head_address`` was found: ``its name resolves``, ``NodeAddr in <file>``,
    #: ``scontrol show node``.
    address_source: str
    port: int

    @property
    def rdzv_id(self) -> str:
        return f"slurm-{self.job_id}.{self.step_id}"

    @property
    def endpoint(self) -> str:
        host = f"[{self.head_address}]" if ":" in self.head_address else self.head_address
        return f"{host}:{self.port}"


def store_port(job_id: int, step_id: int) -> int:
    """The store's port of a step: ``PORT_BASE + (job_id * STEPS_PER_JOB + step_id %
    STEPS_PER_JOB) % PORT_SLOTS``. Two steps get the same port only when their
    ``job_id * 8 + step_id % 8`` are equal modulo 8192: never for steps 0..7 of jobs whose
    ids differ by less than 1024 (consecutive jobs on shared nodes never clash)."""
    return PORT_BASE + (job_id * STEPS_PER_JOB + step_id % STEPS_PER_JOB) % PORT_SLOTS


# -- hostlists ---------------------------------------------------------------------------

_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
#: Most hosts one expression may stand for (a typo like ``n[1-99999999]`` fails fast).
MAX_HOSTS = 1_000_000


def expand_hostlist(text: str) -> list[str]:
    """Slurm's hostlist expression -> host names, in order: ``n[1-3],gpu[01-02]x`` ->
    ``n1 n2 n3 gpu01x gpu02x``. Commas separate hosts outside brackets; each ``[...]``
    (several in one host multiply: ``r[1-2]n[1-2]``) holds numbers and ``lo-hi`` ranges,
    zero-padded to the width of ``lo``. Duplicates are kept. Raises ``ValueError`` (one
    line) for unbalanced or nested brackets, a bad range or more than ``MAX_HOSTS``."""
    hosts: list[str] = []
    for part in _split_top(text):
        if part:
            hosts.extend(_expand_host(part, text))
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"hostlist {text!r} stands for more than {MAX_HOSTS} hosts")
    return hosts


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"hostlist {text!r}: nested brackets")
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"hostlist {text!r}: unbalanced brackets")
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"hostlist {text!r}: unbalanced brackets")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _expand_host(part: str, text: str) -> list[str]:
    names = [""]
    for m in re.finditer(r"([^\[]*)(\[([^\]]*)\])?", part):
        literal_text, bracket, ranges = m.groups()
        names = [n + literal_text for n in names]
        if bracket is not None:
            suffixes = _expand_ranges(ranges, text)
            if len(names) * len(suffixes) > MAX_HOSTS:
                raise ValueError(f"hostlist {text!r} stands for more than {MAX_HOSTS} hosts")
            names = [n + s for n in names for s in suffixes]
    return names


def _expand_ranges(ranges: str, text: str) -> list[str]:
    out: list[str] = []
    for item in ranges.split(","):
        m = _RANGE.fullmatch(item.strip())
        if m is None:
            raise ValueError(f"hostlist {text!r}: bad range {item!r}")
        low, high = m.group(1), m.group(2)
        if high is None:
            out.append(low)
            continue
        lo, hi = int(low), int(high)
        if hi < lo:
            raise ValueError(f"hostlist {text!r}: bad range {item!r}")
        if hi - lo >= MAX_HOSTS:
            raise ValueError(f"hostlist {text!r} stands for more than {MAX_HOSTS} hosts")
        out.extend(f"{i:0{len(low)}d}" for i in range(lo, hi + 1))
    return out


def parse_tasks_per_node(text: str) -> list[int]:
    """``SLURM_STEP_TASKS_PER_NODE`` -> tasks on each node: ``2(x3),1`` -> ``[2, 2, 2, 1]``.
    Raises ``ValueError`` for anything else."""
    out: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*([0-9]+)(?:\(x([0-9]+)\))?\s*", item)
        if m is None or int(m.group(2) or 1) > MAX_HOSTS:
            raise ValueError(f"tasks per node {text!r}: expected N or N(xK), comma-separated")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# -- the head's address ------------------------------------------------------------------


def _read_text(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _run(argv: Sequence[str], timeout: float) -> str:
    done = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    return done.stdout


def _resolves(name: str) -> bool:
    try:
        return bool(socket.getaddrinfo(name, None, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError):
        return False


def slurm_conf_addresses(text: str) -> dict[str, str]:
    """Node name -> address from a ``slurm.conf``'s ``NodeName=`` lines: ``NodeAddr``, else
    ``NodeHostname`` (Slurm's own fallback), hostlists expanded (``NodeName=n[1-3]
    NodeAddr=10.0.0.[1-3]`` pairs them; one address serves every name). Keys are
    case-insensitive, ``#`` starts a comment, ``NodeName=DEFAULT`` and lines that do not
    parse are skipped (``Include`` files are not read)."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.lower().startswith("nodename="):
            continue
        fields: dict[str, str] = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key.lower()] = value
        names_text = fields.get("nodename", "")
        addr_text = fields.get("nodeaddr") or fields.get("nodehostname")
        if not addr_text or names_text.upper() == "DEFAULT":
            continue
        try:
            names, addrs = expand_hostlist(names_text), expand_hostlist(addr_text)
        except ValueError:
            continue
        if len(addrs) == 1:
            addrs = addrs * len(names)
        if len(addrs) == len(names):
            out.update(zip(names, addrs, strict=True))
    return out


def node_address(
    name: str,
    environ: Mapping[str, str],
    *,
    read_file: FileReader = _read_text,
    run: CommandRunner = _run,
    resolves: Resolver = _resolves,
) -> tuple[str, str]:
    """The address other nodes reach node ``name`` at, and how it was found: the name
    itself when it resolves; else its ``NodeAddr`` in the ``slurm.conf`` at
    ``$SLURM_CONF`` (else ``/etc/slurm/slurm.conf``); else ``scontrol show node <name>``
    (at most ``SCONTROL_TIMEOUT`` seconds). Raises :class:`SlurmError` naming the node
    and everything tried."""
    if resolves(name):
        return name, "its name resolves"
    tried = [f"{name!r} does not resolve"]
    conf = environ.get("SLURM_CONF") or DEFAULT_SLURM_CONF
    try:
        address = slurm_conf_addresses(read_file(conf)).get(name)
    except OSError as exc:
        tried.append(f"{conf}: {exc.strerror or exc}")
    else:
        if address:
            return address, f"NodeAddr in {conf}"
        tried.append(f"{conf} has no NodeName line with its NodeAddr")
    argv = ["scontrol", "show", "node", name]
    try:
        out = run(argv, SCONTROL_TIMEOUT)
    except FileNotFoundError:
        tried.append("scontrol: not installed")
    except subprocess.TimeoutExpired:
        tried.append(f"scontrol show node: no answer in {SCONTROL_TIMEOUT:g} s")
    except subprocess.CalledProcessError as exc:
        tried.append(f"scontrol show node: exit {exc.returncode}")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        tried.append(f"scontrol show node: {exc}")
    else:
        m = re.search(r"\bNodeAddr=(\S+)", out)
        if m and m.group(1) not in ("(null)", "None"):
            return m.group(1), "scontrol show node"
        tried.append("scontrol show node: no NodeAddr")
    raise SlurmError(
        f"Slurm mode: cannot find the address of the step's first node {name!r}, which "
        f"hosts the rendezvous store ({'; '.join(tried)}); set rdzv.endpoint=<host>:<port> "
        "(or scheduler=none)"
    )


# -- detection ---------------------------------------------------------------------------


def _int(environ: Mapping[str, str], *names: str) -> tuple[str, int]:
    """The first of ``names`` that is set, and its value as an int >= 0."""
    for name in names:
        if name in environ:
            text = environ[name].strip()
            if not text.isdigit():
                raise SlurmError(f"Slurm mode: {name}={environ[name]!r}: expected an integer")
            return name, int(text)
    raise SlurmError(
        f"Slurm mode: {' or '.join(names)} not set: run elastic-run under srun in a Slurm "
        "job (or scheduler=none)"
    )


def detect(
    environ: Mapping[str, str],
    *,
    required: bool = False,
    read_file: FileReader = _read_text,
    run: CommandRunner = _run,
    resolves: Resolver = _resolves,
) -> SlurmStep | None:
    """The decision for the Slurm job step described by ``environ``; ``None`` when it is
    not a step (``SLURM_JOB_ID`` or ``SLURM_STEP_ID`` unset, or the batch script's own
    step) unless ``required``. Raises :class:`SlurmError` (one line) for a step that
    cannot be used: a variable missing or malformed, several tasks on a node, a first node
    whose address cannot be found."""
    if "SLURM_JOB_ID" not in environ or "SLURM_STEP_ID" not in environ:
        if not required:
            return None
        raise SlurmError(
            "scheduler=slurm: not in a Slurm job step (SLURM_JOB_ID and SLURM_STEP_ID "
            "unset): run elastic-run under srun, e.g. srun --ntasks-per-node=1 elastic-run ..."
        )
    step_text = environ["SLURM_STEP_ID"].strip()
    if not step_text.isdigit() or int(step_text) >= _SPECIAL_STEPS:
        if not required:
            return None
        raise SlurmError(
            f"scheduler=slurm: SLURM_STEP_ID={step_text!r} is not an srun step (the batch "
            "script's own?): run elastic-run under srun --ntasks-per-node=1"
        )
    _, job_id = _int(environ, "SLURM_JOB_ID")
    step_id = int(step_text)
    nodes_var, nnodes = _int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES")
    _, node_rank = _int(environ, "SLURM_NODEID")
    if nnodes < 1 or node_rank >= nnodes:
        raise SlurmError(
            f"Slurm mode: SLURM_NODEID={node_rank} is not a node of the step ({nodes_var}={nnodes})"
        )
    _check_one_task_per_node(environ, nnodes)
    list_var = next(
        (n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if environ.get(n)), None
    )
    if list_var is None:
        raise SlurmError(
            "Slurm mode: SLURM_STEP_NODELIST or SLURM_JOB_NODELIST not set: run elastic-run "
            "under srun in a Slurm job (or scheduler=none)"
        )
    try:
        hosts = expand_hostlist(environ[list_var])
    except ValueError as exc:
        raise SlurmError(f"Slurm mode: {list_var}: {exc}") from None
    if not hosts:
        raise SlurmError(f"Slurm mode: {list_var}={environ[list_var]!r} names no node")
    head = hosts[0]
    address, how = node_address(head, environ, read_file=read_file, run=run, resolves=resolves)
    return SlurmStep(
        job_id=job_id,
        step_id=step_id,
        nnodes=nnodes,
        node_rank=node_rank,
        head=head,
        head_address=address,
        address_source=how,
        port=store_port(job_id, step_id),
    )


def _check_one_task_per_node(environ: Mapping[str, str], nnodes: int) -> None:
    fix = (
        f"elastic-run is one agent per node, which starts the workers itself: run it with "
        f"srun --ntasks-per-node=1 (srun -N{nnodes} --ntasks-per-node=1 elastic-run ...)"
    )
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", "").strip()
    if per_node:
        try:
            counts = parse_tasks_per_node(per_node)
        except ValueError as exc:
            raise SlurmError(f"Slurm mode: SLURM_STEP_TASKS_PER_NODE: {exc}") from None
        if any(c != 1 for c in counts):
            raise SlurmError(
                f"Slurm mode: this step runs {max(counts)} tasks on a node "
                f"(SLURM_STEP_TASKS_PER_NODE={per_node}); {fix}"
            )
        return
    name = next((n for n in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if n in environ), None)
    if name is not None and environ[name].strip().isdigit() and int(environ[name]) > nnodes:
        raise SlurmError(
            f"Slurm mode: this step runs {environ[name].strip()} tasks on {nnodes} "
            f"node{'s' if nnodes != 1 else ''} ({name}); {fix}"
        )


# -- the front door's part ---------------------------------------------------------------

#: Where each value Slurm mode sets comes from, for a one-line error about it.
_SOURCES = {
    "nnodes": "Slurm mode (SLURM_STEP_NUM_NODES)",
    "rdzv.node_rank": "Slurm mode (SLURM_NODEID)",
    "rdzv.id": "Slurm mode (SLURM_JOB_ID, SLURM_STEP_ID)",
    "rdzv.endpoint": "Slurm mode (the step's first node)",
    "rdzv.is_host": "Slurm mode (node rank 0 hosts)",
}


def _overrides(argv: Sequence[str]) -> dict[str, str]:
    """Key -> value of each ``key=value`` override (``+``/``++`` dropped; the last wins)."""
    out: dict[str, str] = {}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        out[key.lstrip("+~")] = value
    return out


def scheduler_choice(argv: Sequence[str]) -> str:
    """``scheduler`` as the command line sets it (``auto`` when it does not). Raises
    :class:`SlurmError` for a value not allowed."""
    value = _overrides(argv).get("scheduler", "auto").strip().strip("'\"")
    if value not in ("auto", "slurm", "none"):
        raise SlurmError(f"scheduler={value}: allowed: auto, slurm, none")
    return value


def _elastic(nnodes: str | None) -> bool:
    if nnodes is None:
        return False
    parts = nnodes.strip().strip("'\"").split(":")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and parts[0] != parts[1]


def plan(step: SlurmStep, argv: Sequence[str]) -> tuple[list[str], ConfigPatch]:
    """The group choice to put before the command line's overrides and the values the
    composed config gets, for ``step`` and the command line ``argv`` (whose keys win)."""
    given = _overrides(argv)
    backend = given.get("rdzv")
    rdzv_keys = {k for k in given if k.startswith("rdzv.")}
    nnodes = given.get("nnodes")
    values: dict[str, Any] = {}
    overrides: list[str] = []
    if backend is not None:  # the user's rendezvous: fill only what it leaves unset
        chosen = f"rdzv={backend} (from the command line)"
        if backend.strip("'\"") != "local":
            if nnodes is None:
                values["nnodes"] = str(step.nnodes)
            if "rdzv.id" not in rdzv_keys:
                values["rdzv.id"] = step.rdzv_id
            if backend.strip("'\"") == "static" and "rdzv.node_rank" not in rdzv_keys:
                values["rdzv.node_rank"] = step.node_rank
    elif step.nnodes == 1 and not _elastic(nnodes):
        chosen = "rdzv=local (one node)"
    else:
        if _elastic(nnodes):
            overrides.append("rdzv=tcp")
            chosen = f"rdzv=tcp (nnodes={nnodes}), is_host on node rank 0"
            values["rdzv.is_host"] = step.node_rank == 0
        else:
            overrides.append("rdzv=static")
            chosen = "rdzv=static, hosted by node rank 0"
            if nnodes is None:
                values["nnodes"] = str(step.nnodes)
            else:  # (an interpolation is Hydra's to read, and validation's to check)
                fixed = nnodes.strip("'\"").split(":")[0].strip()
                if fixed.isdigit() and int(fixed) != step.nnodes:
                    raise SlurmError(
                        f"nnodes={nnodes}: this Slurm step has {step.nnodes} nodes; leave "
                        "nnodes unset (Slurm mode takes the step's), or give nnodes=MIN:MAX "
                        "for an elastic job"
                    )
            values["rdzv.node_rank"] = step.node_rank
        values["rdzv.id"] = step.rdzv_id
        values["rdzv.endpoint"] = step.endpoint
        for key in rdzv_keys:  # the command line's keys keep their values
            values.pop(key, None)
    shown = ", ".join(f"{k}={v}" for k, v in values.items()) or "nothing"
    note = (
        f"Slurm step detected (job {step.job_id}, step {step.step_id}): {step.nnodes} "
        f"node{'s' if step.nnodes != 1 else ''}, node rank {step.node_rank}, id "
        f"{step.rdzv_id}, store {step.head}:{step.port} at {step.endpoint} "
        f"({step.address_source}); {chosen}; sets {shown}"
    )
    return overrides, ConfigPatch(values, (note,), origin="slurm", sources=_SOURCES)


def command_line(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    read_file: FileReader = _read_text,
    run: CommandRunner = _run,
    resolves: Resolver = _resolves,
) -> tuple[list[str], ConfigPatch | None]:
    """The Hydra command line and the patch for ``argv`` (the Hydra form) under the
    scheduler ``environ`` describes: ``argv`` unchanged and no patch when there is none
    (or ``scheduler=none``). Raises :class:`SlurmError` (one line, exit 2)."""
    if any(a in ("-h", "--help", "--hydra-help", "--info") for a in argv):
        return list(argv), None
    choice = scheduler_choice(argv)
    if choice == "none":
        return list(argv), None
    step = detect(
        environ, required=choice == "slurm", read_file=read_file, run=run, resolves=resolves
    )
    if step is None:
        nodes = environ.get("SLURM_NNODES", "").strip()
        if "SLURM_JOB_ID" in environ and nodes.isdigit() and int(nodes) > 1:
            # the batch script of a multi-node job, not a step: a likely slip
            note = (
                f"in Slurm job {environ['SLURM_JOB_ID']} of {nodes} nodes but not in an srun "
                "step (no SLURM_STEP_ID): this agent runs alone; start one per node with srun "
                "--ntasks-per-node=1 elastic-run ..."
            )
            return list(argv), ConfigPatch({}, (note,), origin="slurm")
        return list(argv), None
    overrides, patch = plan(step, argv)
    # among the command line's overrides (argparse reads them as one run of positionals)
    at = next((i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), len(argv))
    return [*argv[:at], *overrides, *argv[at:]], patch
