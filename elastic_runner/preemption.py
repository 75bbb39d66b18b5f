"""Preemption and requeue: a run that resumes where a preempted one left off.

A run stopped by a signal of ``signals.preempt`` exits 75 (:data:`EXIT_PREEMPTED`) and
says ``PREEMPTED`` in its ``result.json``. When the job is started again in the same run
directory (Slurm requeues a job under the same ``SLURM_JOB_ID``; a run directory derived
from it, ``hydra.run.dir=outputs/slurm-${oc.env:SLURM_JOB_ID}/${oc.env:SLURMD_NODENAME}``,
is the same), the new run continues the old one's counts (:func:`resumed`): the restarts
already spent count against ``max_restarts`` and workers see
``TORCHELASTIC_RESTART_COUNT`` go on from there; attempts (and their log directories)
go on too.

With ``signals.requeue=true``, the preempted run's node 0 asks Slurm to requeue the job
(:func:`requeue`), as Lightning's and submitit's auto-requeue do.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping
from pathlib import Path

from elastic_runner.spec import EXIT_PREEMPTED

__all__ = ["requeue", "resumed"]

log = logging.getLogger(__name__)

#: What the run leaves in its directory (``elastic_runner.sweep.RESULT_FILE``; that module
#: imports Hydra, which the assembly step does not).
RESULT_FILE = "result.json"


def resumed(run_dir: Path, run_id: str, env: Mapping[str, str]) -> tuple[int, int]:
    """(attempts, restarts) of the preempted run this one resumes, (0, 0) for a fresh
    run. A run resumes when its directory holds the ``result.json`` of a preempted run
    of the same job: the same run id, or a Slurm job that was requeued
    (``SLURM_RESTART_COUNT`` > 0; its id is the same, the run id may be random)."""
    path = run_dir / RESULT_FILE
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        preempted = previous["exit_code"] == EXIT_PREEMPTED
        same_job = previous.get("run_id") == run_id or _requeued(env)
        attempts, restarts = int(previous["attempts"]), int(previous["restarts"])
    except (OSError, ValueError, KeyError, TypeError):  # none, torn, or not ours
        return 0, 0
    if not (preempted and same_job) or attempts < 0 or restarts < 0:
        return 0, 0
    log.info(
        "resuming a preempted run (%s): %d attempt(s) and %d restart(s) spent before",
        path,
        attempts,
        restarts,
    )
    return attempts, restarts


def _requeued(env: Mapping[str, str]) -> bool:
    try:
        return int(env.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def requeue(env: Mapping[str, str], group_rank: int, timeout: float = 30.0) -> bool:
    """Under Slurm, on the job's first node (``SLURM_NODEID`` 0, else group rank 0):
    ``scontrol requeue $SLURM_JOB_ID``. Its failure is one warning line. True when the
    job was requeued."""
    job = env.get("SLURM_JOB_ID")
    if not job:
        log.warning("signals.requeue: not under Slurm (no SLURM_JOB_ID): nothing to requeue")
        return False
    node = env.get("SLURM_NODEID")
    if (node != "0") if node is not None else group_rank > 0:
        return False  # one node asks, once
    command = ["scontrol", "requeue", job]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("signals.requeue: %s failed: %s", " ".join(command), exc)
        return False
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        log.warning(
            "signals.requeue: %s exited %d: %s",
            " ".join(command),
            done.returncode,
            why[-1] if why else "no output",
        )
        return False
    log.info("preempted: job %s requeued (scontrol requeue)", job)
    return True
