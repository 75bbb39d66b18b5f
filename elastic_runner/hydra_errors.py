"""One line for a Hydra or OmegaConf composition error: the key, the value given and
what is allowed (``elastic-run``'s exit-2 contract), instead of Hydra's multi-line report."""

from __future__ import annotations

import re
from typing import Any

from elastic_runner.plugins import BrokenPlugin

__all__ = ["describe_hydra_error"]


def describe_hydra_error(
    exc: BaseException, argv: list[str], broken: list[BrokenPlugin] | None = None
) -> str | None:
    """One line for a composition error, or ``None`` when ``exc`` is not one. When an
    unknown option may come from an installed plugin that failed to load, ``broken``
    names it."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

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
    if isinstance(cause, ValidationError) and (key := getattr(cause, "full_key", None)):
        msg = str(getattr(cause, "msg", cause)).splitlines()[0]
        return f"{key}={_override_value(argv, key)}: {msg}"
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


def _fields(object_type: Any) -> list[str]:
    fields = getattr(object_type, "__dataclass_fields__", None)
    return sorted(fields) if fields else []
