"""The catalogue of event names: every name the agent emits, used wherever an event is
emitted or matched (the agent, the hang detector, the run status, sinks' tests). Names
follow torch where torch has one (``torchelastic.worker.status.<STATE>``)."""

from __future__ import annotations

import enum
from collections.abc import Mapping

__all__ = [
    "EVENTS",
    "EXIT_BARRIER",
    "FAULT_INJECTED",
    "FENCED",
    "HEALTH_CHECK_REFUSED",
    "MEMBERSHIP_CHANGED",
    "NODE_EXCLUDED",
    "NODE_IN",
    "NODE_OUT",
    "RANKS_ASSIGNED",
    "RENDEZVOUS_COMPLETE",
    "RENDEZVOUS_JOIN",
    "RESTART",
    "SHUTDOWN",
    "SIGNAL",
    "TIMER_EXPIRED",
    "WATCHDOG_FIRED",
    "status",
]

_STATUS = "torchelastic.worker.status."


def status(state: str | enum.Enum) -> str:
    """torch's name for a state change: ``torchelastic.worker.status.<STATE>``. From a
    worker (source ``WORKER``): START, then SUCCEEDED, FAILED or TERMINATED (see
    :class:`~elastic_runner.spec.WorkerStatus`); from the agent (source ``AGENT``): the
    group's final SUCCEEDED or FAILED."""
    return _STATUS + (state.value if isinstance(state, enum.Enum) else state)


RENDEZVOUS_JOIN = "elastic_runner.rendezvous.join"
RENDEZVOUS_COMPLETE = status("RENDEZVOUS")
RANKS_ASSIGNED = "elastic_runner.ranks.assigned"
MEMBERSHIP_CHANGED = "elastic_runner.membership.changed"
RESTART = "elastic_runner.restart"
SIGNAL = "elastic_runner.signal"
SHUTDOWN = "elastic_runner.shutdown"
HEALTH_CHECK_REFUSED = "elastic_runner.health_check.refused"
NODE_OUT = "elastic_runner.node.out"
NODE_IN = "elastic_runner.node.in"
NODE_EXCLUDED = "elastic_runner.node.excluded"
WATCHDOG_FIRED = "elastic_runner.watchdog.fired"
TIMER_EXPIRED = "elastic_runner.timer.expired"
FENCED = "elastic_runner.fenced"
EXIT_BARRIER = "elastic_runner.exit_barrier"
FAULT_INJECTED = "elastic_runner.fault.injected"

#: Every event the agent emits, by name, with what it means (``<STATE>`` stands for each
#: state :func:`status` names).
EVENTS: Mapping[str, str] = {
    RENDEZVOUS_JOIN: "this node joins a rendezvous round (next_attempt)",
    RENDEZVOUS_COMPLETE: "the round completed (round, group_rank, group_world_size, duration_ms)",
    RANKS_ASSIGNED: "this node's workers got their ranks (ranks, role_ranks, world_size, master)",
    status("START"): "a worker started (pid, local_rank)",
    status("SUCCEEDED"): "a worker exited 0; from the agent: the run succeeded",
    status("FAILED"): "a worker failed (exit_code, signal, failure, error); from the agent: "
    "the run failed (reason)",
    status("TERMINATED"): "the agent stopped a worker (exit_code, signal)",
    EXIT_BARRIER: "this node's workers succeeded: it waits for the other nodes to finish",
    MEMBERSHIP_CHANGED: "the job's membership changed (during: run or exit barrier)",
    RESTART: "the group restarts (reason: failure, membership_change or fenced)",
    FENCED: "this node lost contact with the store for the heartbeat timeout: its "
    "workers were killed so that two worlds never run at once",
    SIGNAL: "the agent got a stop signal (signal; sent: what the workers get, null when "
    "they got it too; origin: outside when they did, a scheduler signalling every process, "
    "else agent; gap_ms: between the agent's and the nearest worker's; preempted: one of "
    "signals.preempt). The agent's final FAILED event's reason says the same, e.g. "
    "'stopped by SIGTERM from outside (the scheduler signalled every process)'",
    WATCHDOG_FIRED: "a rank was silent too long (rank, detail)",
    TIMER_EXPIRED: "a worker's timer expired (rank, detail, scope)",
    HEALTH_CHECK_REFUSED: "a health check kept this node out (plugin, reason)",
    NODE_OUT: "a health check failed: this node stays out and checks again (plugin, reason, "
    "retry_in)",
    NODE_IN: "every health check passes again, or an exclusion's cooldown is over "
    "(after: exclusion): this node joins the job",
    NODE_EXCLUDED: "this node was the root cause of exclusion.failures failures within "
    "exclusion.window: it left the job for a cooldown (reason, cooldown, count)",
    FAULT_INJECTED: "fault=... injected a fault on purpose (fault: what and when)",
    SHUTDOWN: "the agent left the job",
}
