"""``python -m elastic_runner verdict DIR``: the job's own result, from every node's
``result.json`` under ``DIR``, for a batch script to exit with.

An elastic job (``nnodes=MIN:MAX``) can lose a node and finish without it; the scheduler
still sees the lost node's task fail (Slurm: ``srun`` exits non-zero, the job is FAILED).
Each node writes ``result.json`` in its run directory; with per-node run directories
under one job directory (``hydra.run.dir=outputs/slurm-${oc.env:SLURM_JOB_ID}/
${oc.env:SLURMD_NODENAME}``), this reads them all after the step:

* a node that failed (exit 1, a bad configuration 2, ...): the job failed, with that code;
* else, a node succeeded: the job succeeded (0). Nodes lost on the way (a run directory
  without ``result.json``: the agent was killed) or stopped by a signal do not count;
* else every node was stopped: preempted (75) if one was, else the signal's 128+N;
* no ``result.json`` at all: 1.

One line on stdout says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from elastic_runner.spec import EXIT_PREEMPTED

__all__ = ["NodeResult", "read_nodes", "verdict"]

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class NodeResult:
    """One node's run directory and what its ``result.json`` says (``None``: none)."""

    name: str
    exit_code: int | None
    state: str = "NO RESULT"
    error: str | None = None

    @property
    def stopped(self) -> bool:
        """Stopped by a signal (preempted too), or lost: no result at all."""
        code = self.exit_code
        return code is None or code == EXIT_PREEMPTED or code > 128

    @property
    def failed(self) -> bool:
        return self.exit_code != 0 and not self.stopped

    def describe(self) -> str:
        if self.exit_code is None:
            return f"{self.name}: no result.json (lost)"
        why = f": {self.error}" if self.error and self.exit_code else ""
        return f"{self.name}: {self.state} (exit {self.exit_code}){why}"


def read_nodes(directory: Path) -> list[NodeResult]:
    """Every ``result.json`` under ``directory``, and every run directory without one
    (it holds Hydra's ``.hydra``, or the agent's ``config.yaml``, but no result)."""
    nodes = []
    dirs = {p.parent for p in directory.rglob(RESULT_FILE)}
    dirs |= {p.parent for p in directory.rglob(".hydra") if p.is_dir()}
    dirs |= {p.parent for p in directory.rglob("config.yaml") if (p.parent / ".hydra").is_dir()}
    for run_dir in sorted(dirs):
        name = str(run_dir.relative_to(directory)) if run_dir != directory else "."
        path = run_dir / RESULT_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            nodes.append(
                NodeResult(name, int(data["exit_code"]), str(data["state"]), data.get("error"))
            )
        except FileNotFoundError:
            nodes.append(NodeResult(name, None))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            nodes.append(NodeResult(name, 1, "UNREADABLE", f"cannot read {path}: {exc}"))
    return nodes


def verdict(directory: Path) -> tuple[int, str]:
    """The job's exit code and one line saying why."""
    nodes = read_nodes(directory)
    if not any(n.exit_code is not None for n in nodes):
        return 1, f"job verdict: no result.json under {directory}: no node finished"
    failed = [n for n in nodes if n.failed]
    ok = [n for n in nodes if n.exit_code == 0]
    others = [n for n in nodes if n.stopped]
    if failed:
        also = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        return failed[0].exit_code or 1, f"job failed: {failed[0].describe()}{also}"
    if ok:
        left = f"; lost or stopped on the way: {', '.join(map(NodeResult.describe, others))}"
        return 0, f"job succeeded on {len(ok)} node(s){left if others else ''}"
    preempted = [n for n in others if n.exit_code == EXIT_PREEMPTED]
    first = (preempted or [n for n in others if n.exit_code is not None])[0]
    assert first.exit_code is not None
    return first.exit_code, f"job stopped: {first.describe()} ({len(others)} node(s) stopped)"
