"""One line for a Hydra or OmegaConf composition error: the key, the value given and
what is allowed (``elastic-run``'s exit-2 contract), instead of Hydra's multi-line report;
and one line for a run directory that cannot be created or written (Hydra makes it and
writes ``.hydra/`` and ``elastic-run.log`` into it before the task runs)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elastic_runner.config import REDACTED, is_secret_name, one_line, redact_text
from elastic_runner.plugins import BrokenPlugin
from elastic_runner.registry import ComponentKind
from elastic_runner.workers.logs import describe_os_error

__all__ = ["check_run_dir", "describe_hydra_error", "describe_run_dir_error"]


def describe_run_dir_error(exc: BaseException, run_dirs: Sequence[str]) -> str | None:
    """One line when ``exc`` (raised while Hydra set up a job) is an ``OSError`` about
    one of ``run_dirs`` (the job's and the sweep's directories, as far as they are known)
    or a file in it: a read-only file system, a file where the directory should be, no
    permission, a full disk. ``None`` when it is something else."""
    error: BaseException | None = exc
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    if not isinstance(error, OSError):
        return None
    name = error.filename
    for run_dir in run_dirs:
        if name is not None and _related(os.fsdecode(name), run_dir):
            return run_dir_message(run_dir, error)
    if error is exc and name is None and run_dirs:  # a write into it (a full disk)
        return run_dir_message(run_dirs[0], error)
    if error is exc and name is not None and not run_dirs:  # making a sweep's directory
        return run_dir_message(os.fsdecode(name), error)
    return None


def check_run_dir(run_dir: str) -> str | None:
    """One line when files cannot be created in ``run_dir`` (made if need be), else
    ``None``: the check before any worker starts, whatever Hydra wrote there already."""
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        return run_dir_message(run_dir, exc)
    return None


def run_dir_message(run_dir: str, exc: OSError) -> str:
    if isinstance(exc, FileExistsError):  # Path.mkdir(exist_ok=True): not a directory
        reason = f"{exc.filename or run_dir} exists and is not a directory"
    elif isinstance(exc, NotADirectoryError):
        reason = f"{describe_os_error(exc)}: a parent of it is a file"
    else:
        reason = describe_os_error(exc)
    return f"cannot write the run directory {run_dir}: {reason}"


def _related(path: str, run_dir: str) -> bool:
    """``path`` is ``run_dir``, in it, or one of its parents."""
    a, b = Path(os.path.abspath(path)), Path(os.path.abspath(run_dir))
    return a == b or b in a.parents or a in b.parents


def describe_hydra_error(
    exc: BaseException, argv: list[str], broken: list[BrokenPlugin] | None = None
) -> str | None:
    """One line for a composition error, or ``None`` when ``exc`` is not one. When an
    unknown option may come from an installed plugin that failed to load, ``broken``
    names it. A secret given in ``argv`` (``rdzv.token=...``) never appears in it."""
    line = _describe(exc, argv, broken)
    return None if line is None else _hide_secrets(line, argv)


def _describe(exc: BaseException, argv: list[str], broken: list[BrokenPlugin] | None) -> str | None:
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        GrammarParseError,
        InterpolationResolutionError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    if isinstance(exc, ValueError | TypeError) and _raised_by_hydra(exc):
        # rdzv=5, logs=null, logs=[[]]: Hydra's defaults list fails with a bare error
        return _group_value(argv)
    if not isinstance(exc, HydraException | OmegaConfBaseException):
        return None
    cause: BaseException = exc
    while not isinstance(cause, OmegaConfBaseException):
        nxt = cause.__cause__ or cause.__context__
        if nxt is None:
            break
        cause = nxt
    text = str(exc).strip()
    if isinstance(exc, MissingConfigException):
        message = _missing_option(exc, text)
        if broken:
            message += "; installed plugins that failed to load: " + "; ".join(
                b.describe() for b in broken
            )
        return message
    if isinstance(exc, OverrideParseException):
        given, sep, _ = str(exc.override).partition("=")
        if sep and _is_secret_key(given):  # the parser's detail quotes the value
            return f"{given}={REDACTED}: cannot parse this override; quote it: '{given}=\"...\"'"
        return (
            f"{exc.override}: cannot parse this override ({text.splitlines()[0]}); quote "
            "values with special characters, e.g. 'job.args=[\"--x=1\"]'"
        )
    ambiguous = re.match(r"Ambiguous value for argument '([\w.]+)=(.*)'", text)
    if ambiguous:
        key, value = ambiguous.groups()
        return (
            f"{key}={value}: unquoted commas mean a --multirun sweep; quote the value: "
            f"'{key}=\"{value}\"'"
        )
    if "No match in the defaults list" in text and (m := re.search(r"'([\w.]+)'", text)):
        group = m.group(1)
        return f"{group}: '{group}' has no default to override; select a preset with +{group}=NAME"
    if isinstance(cause, ConfigKeyError | ConfigAttributeError) and (
        key := getattr(cause, "full_key", None)
    ):
        value = _override_value(argv, key)
        fields = _fields(getattr(cause, "object_type", None))
        where = key.rpartition(".")[0] or "top level"
        allowed = f"allowed keys at {where}: {', '.join(fields)}" if fields else "unknown key"
        return f"{key}={value}: no such key; {allowed}"
    if isinstance(cause, MissingMandatoryValue) and (key := getattr(cause, "full_key", None)):
        return f"{key}=(unset): required"
    if isinstance(cause, InterpolationResolutionError | GrammarParseError) and (
        key := getattr(cause, "full_key", None)
    ):
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        given, value = _override_for(argv, key)
        head = f"{given}={value}" if value is not None else key
        where = f" (at {key})" if given != key else ""
        return f"{head}: {msg}{where}; {_literal_hint(key)}"
    if isinstance(cause, ValidationError) and (key := getattr(cause, "full_key", None)):
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        given, value = _override_for(argv, key)
        if _is_secret_key(key):  # OmegaConf's message quotes the value: keep the type only
            msg = re.sub(r"^Value '.*' of type", "Value of type", msg.split(": ")[0])
        return f"{given}={value if value is not None else '?'}: {msg}"
    return text.splitlines()[0] if text else type(exc).__name__


def _missing_option(exc: Any, text: str) -> str:
    missing = getattr(exc, "missing_cfg_file", None) or ""
    options = getattr(exc, "options", None)
    group, _, name = missing.rpartition("/")
    if group and options is not None:
        return f"{group}={name}: no such option in group '{group}'; allowed: {', '.join(options)}"
    if m := re.search(r"Could not load '([\w/.-]+)'", text):
        group, _, name = m.group(1).rpartition("/")
        return f"{group}={name}: no such option in group '{group}'"
    return text.splitlines()[0]


def _override_value(argv: list[str], key: str) -> str:
    for arg in argv:
        k, sep, v = arg.lstrip("+~").partition("=")
        if sep and k == key:
            return v
    return "?"


def _override_for(argv: list[str], key: str) -> tuple[str, str | None]:
    """The override in ``argv`` that set ``key``: its own (``job.env.X=1``), else the
    nearest parent's (``+job.env={X:null}``, ``job.args=[...]`` for ``job.args[0]``);
    ``(key, None)`` when the value came from a config file."""
    given: dict[str, str] = {}
    for arg in argv:
        k, sep, v = arg.lstrip("+~").partition("=")
        if sep:
            given.setdefault(k, v)
    candidate = key
    while candidate:
        if candidate in given:
            return candidate, given[candidate]
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", candidate)
        candidate = "" if parent == candidate else parent
    return key, None


#: Config groups of elastic-run's own config (Hydra's are ``hydra/...``).
_GROUPS = frozenset({*(kind.group for kind in ComponentKind), "logs", "job"})
_NOT_A_NAME = re.compile(r"null|true|false|[-+]?(inf|nan|[\d_.]+([eE][-+]?\d+)?)", re.I)


def _raised_by_hydra(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside Hydra itself (not in a task it ran)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}hydra{os.sep}" in tb.tb_frame.f_code.co_filename


def _group_value(argv: list[str]) -> str | None:
    """The override that gave a config group a value that is not an option's name (a
    number, a boolean, null) nor a list of names; ``None`` when there is none."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        group, value = key.lstrip("+~"), value.strip()
        if not sep or not (group in _GROUPS or "/" in group):
            continue
        if value.startswith("[") and value.endswith("]"):
            items = [item.strip() for item in value[1:-1].split(",")]
            bad = any(c in value[1:-1] for c in "[]{}") or any(
                _NOT_A_NAME.fullmatch(item) for item in items if item
            )
        else:
            bad = value.startswith("{") or _NOT_A_NAME.fullmatch(value) is not None
        if bad:
            return (
                f"{group}={value}: expected the name of an option of group '{group}' (or a "
                f"list of names; quote a name that looks like a number: {group}='5')"
            )
    return None


def _literal_hint(key: str) -> str:
    """What a ``${...}`` the user meant literally is written as, for ``key``."""
    if key.startswith("job.args"):
        hint = "; a worker's local rank in job.args is %local_rank%"
    elif key == "logs.prefix":
        hint = "; the prefix's fields are {role}, {rank}, {local_rank}, {node}"
    else:
        hint = ""
    return f"write \\${{...}} for a literal ${{...}}{hint}"


def _is_secret_key(key: str) -> bool:
    return is_secret_name(re.sub(r"\[\d+\]$", "", key.lstrip("+~")).rpartition(".")[2])


def _hide_secrets(line: str, argv: list[str]) -> str:
    """``line`` with every secret hidden (``key=value`` and ``key: value`` of a secret
    key, and any secret value given in ``argv``, 3 characters or more, wherever it
    appears) and its control characters escaped."""
    line = redact_text(line)
    for arg in argv:
        key, sep, value = arg.partition("=")
        value = value.strip().strip("'\"")
        if sep and _is_secret_key(key) and len(value) >= 3:
            line = line.replace(value, REDACTED)
    return one_line(line)


def _fields(object_type: Any) -> list[str]:
    fields = getattr(object_type, "__dataclass_fields__", None)
    return sorted(fields) if fields else []
