"""``--multirun``: each sweep point is a whole elastic job in its own directory, with its
own rendezvous id, ports and event log. Every point leaves ``result.json`` in its
directory; :class:`SweepSummary` (a Hydra callback, run where the sweep was launched, after
the launcher returns, whichever launcher ran the points) prints one line per point and
makes the sweep exit non-zero when any point failed or left no result."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["RESULT_FILE", "PointResult", "SweepSummary", "format_summary", "read_results"]

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
    num: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        Path(self.run_dir, RESULT_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")


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
        (sweep_dir / "summary.json").write_text(
            json.dumps([asdict(r) for r in results], indent=1) + "\n"
        )
        code = max((r.exit_code if r.exit_code >= 0 else 1 for r in results), default=0)
        if code:
            raise SystemExit(code)
