"""The built-in metric handlers, a plugin registered through the same hook as third-party
ones: ``none`` (and its alias ``null``; torch's null handler), ``console`` and ``jsonl``."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from elastic_runner.config import MetricsConfig
from elastic_runner.errors import ConfigError
from elastic_runner.hookspecs import hookimpl
from elastic_runner.metrics.api import METRICS, MetricKind, NoMetrics
from elastic_runner.registry import ComponentSpec
from elastic_runner.spec import RunContext
from elastic_runner.workers.logs import JsonlFile, describe_os_error

__all__ = [
    "ConsoleMetrics",
    "ConsoleMetricsConfig",
    "JsonlMetrics",
    "JsonlMetricsConfig",
    "NoMetricsConfig",
    "NullMetricsConfig",
]


@dataclass
class NoMetricsConfig(MetricsConfig):
    handler: str = "none"


@dataclass
class NullMetricsConfig(MetricsConfig):
    handler: str = "null"


@dataclass
class ConsoleMetricsConfig(MetricsConfig):
    handler: str = "console"


@dataclass
class JsonlMetricsConfig(MetricsConfig):
    handler: str = "jsonl"
    #: File in the run directory, one JSON object a line.
    file: str = "metrics.jsonl"


def _label_text(labels: Mapping[str, str] | None) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


class ConsoleMetrics:
    """One line per value on stderr: ``[metric] workers.failures{kind=EXIT_CODE} 1``."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        stream = self._stream or sys.stderr
        stream.write(f"[metric] {name}{_label_text(labels)} {value:g}\n")

    def close(self) -> None:
        """Nothing to release (stderr stays open)."""


class JsonlMetrics:
    """Appends ``{"name", "value", "labels", "kind", "timestamp"}`` per value; each line
    written whole at once, so a crash loses nothing.

    A disk fault does not stop the run: the first failed write (a full disk, an I/O error)
    is one warning, then values are dropped (the file keeps only whole lines)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file = JsonlFile(self.path, "metric values are dropped from now on (the run goes on)")

    def put(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        info = METRICS.get(name)
        record = {
            "name": name,
            "value": value,
            "labels": dict(labels or {}),
            "kind": info.kind.value if info else MetricKind.GAUGE.value,
            "timestamp": time.time(),
        }
        self._file.append(json.dumps(record, separators=(",", ":")))

    def close(self) -> None:
        self._file.close()


def _jsonl(config: JsonlMetricsConfig, context: RunContext) -> JsonlMetrics:
    path = context.run_dir / config.file
    try:
        return JsonlMetrics(path)
    except OSError as exc:  # at start, before any worker: the user can fix it
        raise ConfigError(
            "metrics.file", config.file, f"cannot open {path}: {describe_os_error(exc)}"
        ) from None


@hookimpl
def elastic_runner_metric_handlers() -> Sequence[ComponentSpec]:
    return [
        ComponentSpec("none", lambda c, ctx: NoMetrics(), NoMetricsConfig, "discard"),
        ComponentSpec("null", lambda c, ctx: NoMetrics(), NullMetricsConfig, "discard"),
        ComponentSpec(
            "console", lambda c, ctx: ConsoleMetrics(), ConsoleMetricsConfig, "lines on stderr"
        ),
        ComponentSpec("jsonl", _jsonl, JsonlMetricsConfig, "metrics.jsonl in the run directory"),
    ]
