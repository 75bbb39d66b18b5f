"""The torchrun front end: ``elastic-run torchrun ARGS...`` (or ``python -m
elastic_runner.torchrun ARGS...``) runs any torchrun 2.x command line unchanged, with the
``PET_*`` environment fallbacks of torchrun's options.

:mod:`~elastic_runner.torchrun.options` reads the command line as torch 2.13's parser
does; :mod:`~elastic_runner.torchrun.translate` maps it onto elastic-run's configuration;
:mod:`~elastic_runner.torchrun.front` assembles the Hydra command line, so a torchrun line
runs through the same composition, validation and run as ``elastic-run key=value ...``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elastic_runner.torchrun.options import (
        TorchrunArgs,
        TorchrunUsageError,
        parse_torchrun_args,
    )
    from elastic_runner.torchrun.translate import Translation, translate

__all__ = ["TorchrunArgs", "TorchrunUsageError", "Translation", "parse_torchrun_args", "translate"]

#: Imported on first use: ``elastic-run`` imports :mod:`~elastic_runner.torchrun.hints`
#: on every start, and the option table and translation cost ~7 ms it does not need
#: unless the command line is a torchrun one.
_LAZY = {
    "TorchrunArgs": "elastic_runner.torchrun.options",
    "TorchrunUsageError": "elastic_runner.torchrun.options",
    "parse_torchrun_args": "elastic_runner.torchrun.options",
    "Translation": "elastic_runner.torchrun.translate",
    "translate": "elastic_runner.torchrun.translate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'elastic_runner.torchrun' has no attribute {name!r}")
