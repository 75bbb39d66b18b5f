"""Errors a front door turns into one line and an exit code, importable from anywhere
(the worker side, the loop, plugins) without pulling in Hydra or OmegaConf."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad configuration: one line naming the key, the value and what is allowed
    (``elastic-run`` prints it and exits 2; no worker starts)."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)}: {allowed}")


def _show(value: object) -> str:
    if value is None:
        return "(unset)"
    return str(value)
