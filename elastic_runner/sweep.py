"""``--multirun``: each sweep point is a whole elastic job in its own directory, with its
own rendezvous id, ports and event log. Every point leaves ``result.json`` in its
directory; :class:`SweepSummary` (a Hydra callback, run where the sweep was launched, after
the launcher returns, whichever launcher ran the points) prints one line per point and
makes the sweep exit non-zero when any point failed or left no result.

:class:`Redaction`, the other Hydra callback, hides secrets in the files Hydra writes
before each job runs (``.hydra/*.yaml``, a sweep's ``multirun.yaml``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from elastic_runner.spec import RunResult
from elastic_runner.workers.logs import describe_os_error

__all__ = [
    "RESULT_FILE",
    "PointResult",
    "Redaction",
    "SweepSummary",
    "format_summary",
    "read_results",
]

RESULT_FILE = "result.json"


@dataclass
class PointResult:
    """How one sweep point (or a plain run) ended."""

    overrides: list[str]
    exit_code: int
    state: str
    seconds: float
    run_dir: str
    run_id: str | None = None
    attempts: int = 0
    restarts: int = 0
    #: The root cause, the rendezvous error or the configuration error, in one line.
    error: str | None = None
    #: Each time the node was excluded for causing failures (``exclusion.*``), and why.
    excluded: list[str] = field(default_factory=list)
    num: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_run(cls, result: RunResult) -> PointResult:
        """How a finished run ended (overrides and time are the caller's to fill in)."""
        state = result.state.value
        if result.signal is not None:
            verb = "PREEMPTED" if result.preempted else "STOPPED"
            state = f"{verb} by {signal.Signals(result.signal).name}"
        return cls(
            overrides=[],
            exit_code=result.exit_code,
            state=state,
            seconds=0.0,
            run_dir=str(result.run_dir),
            run_id=result.run_id,
            attempts=result.attempts,
            restarts=result.restart_count,
            error=_error(result),
            excluded=list(result.excluded),
        )

    def write(self) -> bool:
        """Write ``result.json`` whole or not at all (a sweep's summary never reads a torn
        one). A failure (a full disk, a read-only directory) is one line on stderr and
        ``False``: the run's exit code stays what it was."""
        path = Path(self.run_dir, RESULT_FILE)
        try:
            _write_whole(path, json.dumps(asdict(self), indent=1) + "\n")
        except OSError as exc:
            print(
                f"elastic-run: warning: cannot write {path}: {describe_os_error(exc)}",
                file=sys.stderr,
                flush=True,
            )
            return False
        return True


def _error(result: RunResult) -> str | None:
    """The root cause in one line; a crash-loop verdict first (it names the step)."""
    root = result.root_cause.summary() if result.root_cause else None
    if result.no_progress:
        return f"{result.ended_because}; last root cause: {root}" if root else result.ended_because
    if not result.is_failed() and not root:  # success: a standby's "never needed" is none
        return None
    return root or result.ended_because or None


def _write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file renamed over it: the file is whole
    or absent, never torn; the temporary file goes when the write fails."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def read_results(sweep_dir: Path) -> list[PointResult]:
    """Each point's result, in job order; a point directory without ``result.json`` (its
    process died) is a failure with exit code -1."""
    results = []
    for point in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        path = point / RESULT_FILE
        if path.exists():
            results.append(PointResult(**json.loads(path.read_text())))
        elif (point / ".hydra").exists():
            results.append(
                PointResult([], -1, "NO RESULT", 0.0, str(point), error="no result.json")
            )
    return sorted(results, key=lambda r: (r.num is None, r.num or 0, r.run_dir))


def format_summary(results: list[PointResult], sweep_dir: Path) -> str:
    failed = [r for r in results if r.exit_code != 0]
    head = (
        f"elastic-run: sweep of {len(results)} point(s): {len(results) - len(failed)} "
        f"succeeded, {len(failed)} failed. Sweep directory: {sweep_dir}"
    )
    lines = [head]
    width = max((len(" ".join(r.overrides)) for r in results), default=0)
    for r in results:
        overrides = " ".join(r.overrides) or "(no overrides)"
        outcome = "ok" if r.exit_code == 0 else f"{r.state} (exit {r.exit_code})"
        line = (
            f"  #{r.num if r.num is not None else '?'}  {overrides:<{width}}  {outcome:<18}"
            f"  {r.seconds:6.1f} s  {r.restarts} restart(s)  {r.run_dir}"
        )
        lines.append(line)
        if r.error:
            lines.append(f"      {r.error}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Prints the sweep summary and turns any failed point into a non-zero exit."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        if not sweep_dir.is_dir():
            return
        results = read_results(sweep_dir)
        print(format_summary(results, sweep_dir), file=sys.stderr, flush=True)
        path = sweep_dir / "summary.json"
        try:
            _write_whole(path, json.dumps([asdict(r) for r in results], indent=1) + "\n")
        except OSError as exc:
            print(
                f"elastic-run: warning: cannot write {path}: {describe_os_error(exc)}",
                file=sys.stderr,
                flush=True,
            )
        code = max((r.exit_code if r.exit_code >= 0 else 1 for r in results), default=0)
        if code:
            raise SystemExit(code)


#: The files Hydra writes into a job's ``hydra.output_subdir`` (``.hydra``).
_HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


class Redaction(Callback):
    """Hides secrets in the files Hydra writes before the task runs: the job's
    ``.hydra/{config,hydra,overrides}.yaml`` and, in a sweep, ``multirun.yaml``. Each is
    rewritten with every secret as ``***`` (``rdzv.token=***``, ``HF_TOKEN: '***'``:
    :func:`~elastic_runner.config.redact`) and readable by its owner only. Hydra saves
    them just before ``on_job_start``, so no worker ever sees a secret there (nor does
    any launcher's job: callbacks run in the job's process). A file that cannot be
    rewritten is deleted, with one line on stderr."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        files = []
        subdir = OmegaConf.select(config, "hydra.output_subdir", default=None)
        output_dir = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        if subdir is not None and output_dir is not None:
            files += [Path(str(output_dir), str(subdir), name) for name in _HYDRA_FILES]
        if str(OmegaConf.select(config, "hydra.mode", default="")) == "RunMode.MULTIRUN":
            files.append(Path(str(config.hydra.sweep.dir), "multirun.yaml"))
        for path in files:
            _redact_file(path)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Again, for a sweep none of whose jobs ran (a point that failed to compose)."""
        _redact_file(Path(str(config.hydra.sweep.dir), "multirun.yaml"))


def _redact_file(path: Path) -> None:
    """Rewrite the YAML file ``path`` with its secrets hidden, mode 0600; delete it when
    that fails (a full disk): a record is worth less than a secret."""
    import yaml

    from elastic_runner.config import may_hold_secrets, redact, write_private

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    except OSError as exc:
        print(
            f"elastic-run: warning: cannot read {path}: {describe_os_error(exc)}", file=sys.stderr
        )
        return
    try:
        data = yaml.load(text, Loader=loader) if may_hold_secrets(text) else None
        hidden = redact(data)
        if hidden == data:
            os.chmod(path, 0o600)
        else:
            dumped = yaml.dump(
                hidden, Dumper=dumper, default_flow_style=False, sort_keys=False, allow_unicode=True
            )
            write_private(path, str(dumped))
    except (OSError, yaml.YAMLError) as exc:
        why = describe_os_error(exc) if isinstance(exc, OSError) else type(exc).__name__
        with contextlib.suppress(OSError):
            path.unlink()
        print(
            f"elastic-run: warning: cannot hide the secrets in {path} ({why}); deleted it",
            file=sys.stderr,
            flush=True,
        )
