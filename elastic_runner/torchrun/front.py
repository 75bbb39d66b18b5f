"""``elastic-run [OVERRIDES...] torchrun ARGS...``: from a torchrun command line to the
Hydra command line and the values the composed config gets.

elastic-run's own settings reach a torchrun line as Hydra overrides written before the
word ``torchrun`` (``elastic-run watchdog.no_output_timeout=300 torchrun ...``) or in
``ELASTIC_RUN_OVERRIDES`` (split like a shell line), for launchers that own the command
line. Those win over what the torchrun options say.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Mapping, Sequence

from elastic_runner.config_patch import ConfigPatch
from elastic_runner.torchrun.options import TorchrunUsageError, parse_torchrun_args
from elastic_runner.torchrun.translate import translate

__all__ = [
    "OVERRIDES_ENV",
    "SOURCES",
    "TorchrunUsageError",
    "prepare",
    "split_torchrun_form",
]

#: Extra Hydra overrides for the torchrun form, split like a shell line.
OVERRIDES_ENV = "ELASTIC_RUN_OVERRIDES"

#: Where each key's value came from, to name it in a one-line error (any other ``rdzv.*``
#: key: ``--rdzv-conf``).
SOURCES = {
    "nnodes": "--nnodes",
    "job.nproc_per_node": "--nproc-per-node",
    "max_restarts": "--max-restarts",
    "job.role": "--role",
    "job.entrypoint": "the training script",
    "job.module": "the training module (-m)",
    "rdzv.id": "--rdzv-id",
    "rdzv.endpoint": "--rdzv-endpoint",
    "rdzv.node_rank": "--node-rank",
    "rdzv.local_addr": "--local-addr",
    "rdzv.master_addr": "--master-addr",
    "rdzv.master_port": "--master-port",
    "signals.forward": "--signals-to-handle",
    "stop_timeout": "--shutdown-timeout",
    "logs.prefix": "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE",
    "logs.console_local_ranks": "--local-ranks-filter",
    "rdzv.": "--rdzv-conf",
}


def split_torchrun_form(argv: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """``[overrides..., "torchrun", args...]`` -> (overrides, args); ``None`` for the Hydra
    form. Only overrides (``key=value``, ``+key=value``, ``~key``) may come first."""
    for i, arg in enumerate(argv):
        if arg == "torchrun":
            return list(argv[:i]), list(argv[i + 1 :])
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            return None
    return None


def prepare(
    overrides: Sequence[str],
    torchrun_argv: Sequence[str],
    environ: Mapping[str, str],
    backends: Collection[str],
) -> tuple[list[str], ConfigPatch]:
    """The Hydra command line and the patch for a torchrun command line. Raises
    :class:`TorchrunUsageError` (one line) on bad input."""
    args = parse_torchrun_args(torchrun_argv, environ)
    translation = translate(args, environ, backends=backends)
    try:
        extra = shlex.split(environ.get(OVERRIDES_ENV, ""))
    except ValueError as exc:
        raise TorchrunUsageError(f"{OVERRIDES_ENV}: {exc}") from None
    user = [*overrides, *extra]
    user_keys = {_key(o) for o in user}
    chosen = {o.partition("=")[0] for o in translation.overrides}
    if clash := sorted(chosen & user_keys):
        raise TorchrunUsageError(
            f"{clash[0]}= is chosen by the torchrun options (--rdzv-backend, --standalone, "
            "--nnodes); change it there"
        )
    values = {
        k: v
        for k, v in translation.values.items()
        if not any(k == u or k.startswith(f"{u}.") for u in user_keys)
    }
    notes = list(translation.notes)
    if pod_level := [name for name in ("WORLD_SIZE", "RANK") if name in environ]:
        # Kubeflow's PyTorchJob sets them on the agent's container
        notes.append(
            f"{'/'.join(pod_level)} of the agent's environment: not passed on; each worker "
            "gets its own"
        )
    patch = ConfigPatch(values, tuple(notes), args.from_env, sources=SOURCES)
    return [*translation.overrides, *user], patch


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")
