"""Files shipped with elastic_runner: the Hydra configs and the bundled examples.

In a wheel they live inside the package (``elastic_runner/conf``,
``elastic_runner/examples``); in a source checkout (editable install) they are the
top-level ``conf/`` and ``examples/`` folders.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["conf_dir", "example_path"]

_PACKAGE = Path(__file__).resolve().parent


def _locate(name: str) -> Path:
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"elastic_runner's {name}/ folder is missing from {_PACKAGE}")


def conf_dir() -> Path:
    """The primary Hydra config directory."""
    return _locate("conf")


def example_path(relative: str) -> str:
    """Absolute path of a bundled example file, e.g. ``resnet/train.py``."""
    return str(_locate("examples") / relative)
