"""Fault injection, for testing one's own restart path: the ``fault`` config group.

Off unless a fault is selected by name (``fault=none`` is the default; a preset cannot
select one by accident: the job presets are another group), and loud when on: the run
says so when it starts, every injected fault is an event
(``elastic_runner.fault.injected``) and a line of the report, and a worker it killed is
reported as ``killed by SIGKILL (injected fault)``::

    elastic-run +job=resnet max_restarts=2 fault=kill_rank fault.rank=1 fault.after=10

- ``kill_rank``: send ``fault.signal`` (SIGKILL) to global rank ``fault.rank`` (its whole
  process tree) ``fault.after`` seconds after the workers started, or once a worker of
  its node reported ``fault.at_step`` (``elastic_runner.heartbeat(step=...)``), on
  attempt ``fault.attempt`` (1: the first; 0: every attempt);
- ``hang_rank``: the same with SIGSTOP: the rank hangs (the watchdog's case);
- ``kill_agent``: SIGKILL this agent (or, with ``fault.node``, the agent of that group
  rank when every node gets the same overrides) ``fault.after`` seconds into attempt
  ``fault.attempt``: a whole node lost (its guardian kills its workers). The agent that
  hosts the ``tcp`` store takes a job of two with it (with three nodes or more, the
  store moves to a survivor);
- ``fail_check``: this node fails its health check ``fault.checks`` times in a row (with
  ``checks.retry_for`` it stays out, then joins); ``fault.host`` limits it to the node of
  that hostname when every node gets the same overrides.
"""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass, field

from elastic_runner.hookspecs import hookimpl
from elastic_runner.spec import RunContext, Worker

__all__ = [
    "FAULTS",
    "FailCheck",
    "FailCheckFault",
    "FaultConfig",
    "FaultInjector",
    "HangRankFault",
    "Injection",
    "KillAgentFault",
    "KillRankFault",
    "signal_name",
]

#: How often the loop looks at the workers' steps while a step-triggered fault is armed.
STEP_POLL = 0.1


@dataclass
class FaultConfig:
    """No fault (``fault=none``)."""

    kind: str = "none"


@dataclass
class KillRankFault(FaultConfig):
    """Signal one rank (``fault=kill_rank``)."""

    kind: str = "kill_rank"
    #: The global rank to signal.
    rank: int = 0
    signal: str = "SIGKILL"
    #: Seconds after the attempt's workers started (null: use at_step).
    after: float | None = None
    #: Once a worker of the rank's node reported this step (null: use after).
    at_step: int | None = None
    #: The attempt to inject in: 1 the first, 0 every attempt.
    attempt: int = 1


@dataclass
class HangRankFault(KillRankFault):
    """Stop one rank with SIGSTOP: it hangs (``fault=hang_rank``)."""

    kind: str = "hang_rank"
    signal: str = "SIGSTOP"


@dataclass
class KillAgentFault(FaultConfig):
    """SIGKILL the agent of one node (``fault=kill_agent``)."""

    kind: str = "kill_agent"
    #: The group rank of the node whose agent dies (null: the agent given this config).
    node: int | None = None
    after: float = 1.0
    attempt: int = 1


@dataclass
class FailCheckFault(FaultConfig):
    """Fail this node's health check (``fault=fail_check``)."""

    kind: str = "fail_check"
    #: How many checks in a row fail.
    checks: int = 1
    #: Only on the node of this hostname (null: the node this config is given to).
    host: str | None = None


#: The options of the ``fault`` group, by name.
FAULTS: dict[str, type[FaultConfig]] = {
    "none": FaultConfig,
    "kill_rank": KillRankFault,
    "hang_rank": HangRankFault,
    "kill_agent": KillAgentFault,
    "fail_check": FailCheckFault,
}


@dataclass(frozen=True)
class Injection:
    """A fault due now: a signal to one local rank's tree, or (``local_rank`` -1) the
    agent's own SIGKILL."""

    local_rank: int
    signal: int
    describe: str


@dataclass
class FaultInjector:
    """Says which fault is due when; the agent's loop carries it out (the only place
    that signals workers)."""

    config: FaultConfig
    _armed_at: float | None = None
    _attempt: int = 0
    _group_rank: int = -1
    _targets: dict[int, int] = field(default_factory=dict)  # global rank -> local rank
    _done: bool = False

    @property
    def wants_steps(self) -> bool:
        """The workers must report their steps (a fault at a step)."""
        return isinstance(self.config, KillRankFault) and self.config.at_step is not None

    @property
    def summary(self) -> str:
        """What is armed, for the line the run starts with."""
        c = self.config
        if isinstance(c, KillRankFault):
            when = f"after {c.after:g} s" if c.after is not None else f"at step {c.at_step}"
            on = "every attempt" if c.attempt == 0 else f"attempt {c.attempt}"
            return f"fault={c.kind}: {c.signal} to rank {c.rank} {when} on {on}"
        if isinstance(c, KillAgentFault):
            return (
                f"fault=kill_agent: SIGKILL to {_agent(c.node)} {c.after:g} s into "
                f"attempt {c.attempt}"
            )
        if isinstance(c, FailCheckFault):
            return f"fault=fail_check: {c.checks} failed health check(s)"
        return "no fault"

    def attempt_started(
        self, now: float, attempt: int, group_rank: int, workers: list[Worker]
    ) -> None:
        """The workers of ``attempt`` started at ``now`` with these ranks: arm."""
        self._attempt, self._group_rank, self._armed_at = attempt, group_rank, now
        self._targets = {w.global_rank: w.local_rank for w in workers}
        self._done = False

    def _armed(self, attempt: int) -> bool:
        return not self._done and self._armed_at is not None and attempt in (0, self._attempt)

    def next_due(self) -> float | None:
        """When the loop must look again (``None``: nothing armed)."""
        c = self.config
        if isinstance(c, KillRankFault) and self._armed(c.attempt) and c.rank in self._targets:
            assert self._armed_at is not None
            return self._armed_at + c.after if c.after is not None else self._armed_at + STEP_POLL
        mine = isinstance(c, KillAgentFault) and c.node in (None, self._group_rank)
        if isinstance(c, KillAgentFault) and mine and self._armed(c.attempt):
            assert self._armed_at is not None
            return self._armed_at + c.after
        return None

    def due(self, now: float, step: int | None) -> Injection | None:
        """The fault to inject now, if any (once per attempt)."""
        c = self.config
        due = self.next_due()
        if due is None:
            return None
        if isinstance(c, KillRankFault):
            if c.after is not None and now < due:
                return None
            if c.after is None and (step is None or c.at_step is None or step < c.at_step):
                self._armed_at = now  # poll again
                return None
            self._done = True
            when = f"{c.after:g} s after start" if c.after is not None else f"at step {step}"
            return Injection(
                self._targets[c.rank],
                int(signal.Signals[signal_name(c.signal)]),
                f"fault={c.kind}: {signal_name(c.signal)} to rank {c.rank} {when}, "
                f"attempt {self._attempt}",
            )
        if isinstance(c, KillAgentFault) and now >= due:
            self._done = True
            what = f"fault=kill_agent: SIGKILL to {_agent(c.node)}"
            return Injection(-1, int(signal.SIGKILL), what)
        return None


def _agent(node: int | None) -> str:
    return "this agent" if node is None else f"node {node}'s agent"


def signal_name(name: str) -> str:
    """``kill`` or ``SIGKILL`` -> ``SIGKILL`` (checked against the signals by the config)."""
    full = str(name).upper()
    return full if full.startswith("SIG") else f"SIG{full}"


@dataclass
class FailCheck:
    """``fault=fail_check`` as a health-check plugin of the run."""

    config: FailCheckFault
    failed: int = 0

    @hookimpl
    def elastic_runner_before_rendezvous(self, context: RunContext) -> str | None:
        c = self.config
        if c.host is not None and c.host != socket.gethostname():
            return None
        if self.failed >= c.checks:
            return None
        self.failed += 1
        return f"injected fault (fault=fail_check, {self.failed} of {c.checks})"
