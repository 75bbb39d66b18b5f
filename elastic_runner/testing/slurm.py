"""A real Slurm cluster for tests: three fake nodes on one machine, stopped by pid.

:class:`SlurmCluster` writes a private ``slurm.conf`` (Slurm's ``MULTIPLE_SLURMD`` build:
fake nodes ``n1..nN``, all ``NodeAddr=127.0.0.1``) into a temporary directory, with free
ports, a unique cluster name and a random first job id, and starts there a private
``munged`` (own key and socket, so no system munge is needed, touched or shared),
``slurmctld -D`` and one ``slurmd -D -N nK`` per node. It is ready when ``sinfo`` shows
every node idle (about 1 s). Client commands use it through :meth:`SlurmCluster.env`
(``SLURM_CONF``), or the helpers::

    def test_something(slurm_cluster):
        job_id = slurm_cluster.sbatch("#!/bin/bash\\nsrun hostname\\n", "-N3")
        job = slurm_cluster.wait_job(job_id, timeout=30)
        assert job.state == "COMPLETED" and job.exit_code == 0
        print(slurm_cluster.output(job_id))

:meth:`SlurmCluster.stop` cancels the jobs, stops every daemon by pid, kills what is left
of the cluster's processes (found by a marker in their environment, ``slurmstepd`` by
its working directory) and removes the
directory. Two clusters on one machine (pytest-xdist workers, parallel sessions, a
crashed session's leftovers) share nothing: ports, names, job ids, spool and state
directories and munge are all their own. A crashed session's daemons are swept by the
next cluster that starts (:func:`sweep_leftovers`).

Needs root (``SlurmUser=root``), Linux, and Debian's ``slurm-wlm slurmd slurmctld
slurm-client munge`` (Slurm 22.05). In pytest use the ``slurm_cluster`` fixture (one
cluster per test process and session): it skips the test, with the reason, where Slurm
is not installed, and fails instead under CI (``CI`` set), where it must run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

__all__ = [
    "MARKER_ENV",
    "TERMINAL_STATES",
    "SlurmCluster",
    "SlurmError",
    "SlurmJob",
    "SlurmUnavailable",
    "cluster_of",
    "parse_job",
    "require_slurm",
    "slurm_cluster",
    "slurm_unavailable_reason",
    "sweep_leftovers",
]

MARKER_ENV = "ELASTIC_RUNNER_SLURM_CLUSTER"
"""Set to the cluster's name in its daemons' environment and in :meth:`SlurmCluster.env`,
so every process of the cluster (daemons, ``slurmstepd``, the jobs' processes, which
inherit the submitter's environment) can be found, whoever its parent is."""

# A cluster's name: "er", the hex pid of the process that made it, 4 random hex digits.
_NAME = re.compile(r"er([0-9a-f]+)[0-9a-f]{4}")
_DIR_NAME = re.compile(r"slurm-(er[0-9a-f]+)-")  # its directory's name starts so

TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
"""Job states after which the job has no process left (``COMPLETING`` is not one)."""

_TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sinfo", "srun", "sbatch", "scontrol")
_FIELD = re.compile(r"([A-Za-z][\w/:.]*)=(.*?)(?=\s+[A-Za-z][\w/:.]*=|\s*$)")


class SlurmError(RuntimeError):
    """A daemon did not start or a client command failed; the message names the log."""


class SlurmUnavailable(SlurmError):
    """A Slurm cluster cannot be started here; the message says why (tests skip on it)."""


def slurm_unavailable_reason() -> str | None:
    """Why a :class:`SlurmCluster` cannot start in this process, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not root (the test cluster runs its daemons and jobs as root)"
    missing = [tool for tool in _TOOLS if _which(tool) is None]
    if missing:
        return (
            f"{', '.join(missing)} not found (apt-get install slurm-wlm slurmd slurmctld "
            "slurm-client munge)"
        )
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held together while choosing, so they
    differ; the daemons bind them a moment later)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class SlurmJob:
    """A job as ``scontrol show job`` sees it."""

    job_id: str
    state: str
    """``PENDING``, ``RUNNING``, ``COMPLETING``, ``COMPLETED``, ``FAILED``, ``CANCELLED``..."""
    exit_code: int
    """The batch script's exit code (the first half of ``ExitCode=rc:sig``)."""
    signal: int
    """The signal that ended the batch script, 0 if none (the second half)."""
    fields: Mapping[str, str] = field(repr=False)
    """Every ``Key=Value`` of ``scontrol show job -o``."""

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


def parse_job(line: str) -> SlurmJob:
    """A :class:`SlurmJob` from one line of ``scontrol show job -o``."""
    fields = {m.group(1): m.group(2) for m in _FIELD.finditer(line.strip())}
    rc, _, sig = fields.get("ExitCode", "0:0").partition(":")
    return SlurmJob(
        job_id=fields["JobId"],
        state=fields["JobState"],
        exit_code=int(rc or 0),
        signal=int(sig or 0),
        fields=fields,
    )


class SlurmCluster:
    """``nodes`` fake nodes (``n1..nN``, ``cpus`` each) under one slurmctld, on loopback."""

    def __init__(self, nodes: int = 3, cpus: int = 2, base: Path | None = None) -> None:
        if not 1 <= nodes <= 64:
            raise ValueError(f"nodes must be 1..64, not {nodes}")
        self.nodes = [f"n{k}" for k in range(1, nodes + 1)]
        self.cpus = cpus
        self.name = f"er{os.getpid():x}{secrets.token_hex(2)}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"slurm-{self.name}-", dir=base))
        self.conf = self.dir / "slurm.conf"
        self.log_dir = self.dir / "log"
        self.jobs_dir = self.dir / "jobs"
        self.munge_socket = self.dir / "munge" / "munge.sock"
        ports = _free_ports(2 + nodes)
        self.ctld_port, self.slurmd_port, self.node_ports = ports[0], ports[1], ports[2:]
        # Job ids of clusters on one machine must differ: tests name runs after them.
        self.first_job_id = 1000 + secrets.randbelow(60_000_000)
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.start_seconds: float | None = None
        """How long :meth:`start` took, from writing the config to every node idle."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        """Start munged, slurmctld and the slurmds; return when every node is idle."""
        t0 = time.monotonic()
        try:
            reason = slurm_unavailable_reason()
            if reason:
                raise SlurmUnavailable(reason)
            sweep_leftovers()
            self._write_config()
            self._start_munged(deadline=t0 + timeout)
            self._spawn(
                "slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-f", str(self.conf)]
            )
            for node in self.nodes:
                self._spawn(
                    f"slurmd.{node}",
                    [_which("slurmd") or "slurmd", "-D", "-N", node, "-f", str(self.conf)],
                )
            self._await_idle(deadline=t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 15.0) -> list[str]:
        """Cancel the jobs, stop every daemon by pid (SIGTERM, then SIGKILL after
        ``timeout`` s), kill any process of the cluster still alive, and remove the
        directory. Returns what went wrong on the way (jobs' processes that outlived
        ``scancel``, daemons that ignored SIGTERM, processes left once the daemons had
        ended), each already dealt with; ``[]`` for a clean stop. Safe to call twice."""
        problems = []
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            try:
                self.cancel_all()
            except (SlurmError, subprocess.SubprocessError, OSError) as exc:
                problems.append(f"cancelling the jobs: {exc}")
        slurm = {name: proc for name, proc in self.daemons.items() if name != "munged"}
        munge = {name: proc for name, proc in self.daemons.items() if name == "munged"}
        for daemons in (slurm, munge):  # munged last: the others talk to it until they end
            for proc in daemons.values():
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + timeout
            for name, proc in daemons.items():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    problems.append(f"{name} (pid {proc.pid}) ignored SIGTERM for {timeout:g} s")
                    proc.kill()
                    proc.wait()
        # slurmstepd ends with its job; give the last ones a moment, then kill the rest
        _, alive = psutil.wait_procs(self.processes(), timeout=2)
        for left in alive:
            with contextlib.suppress(psutil.Error):
                problems.append(f"left after the daemons ended: {_describe(left)}")
                left.kill()
        psutil.wait_procs(self.processes(), timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: its daemons, its ``slurmstepd``s and the
        jobs' processes (see :func:`cluster_of`)."""
        found = []
        for proc in psutil.process_iter(["pid"]):
            if proc.pid != os.getpid() and cluster_of(proc) == self.name:
                found.append(proc)
        return found

    def _job_processes(self) -> list[psutil.Process]:
        daemons = {p.pid for p in self.daemons.values()}
        return [p for p in self.processes() if p.pid not in daemons]

    # -- clients -----------------------------------------------------------------------

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment for client commands of this cluster: ``base`` (default: this
        process's) without its ``SLURM_*`` variables (a session run inside a Slurm job
        must not leak them), plus ``SLURM_CONF``, the cluster marker and ``extra``."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith("SLURM_")
        }
        env.update({"SLURM_CONF": str(self.conf), MARKER_ENV: self.name})
        env.update(extra)
        return env

    def run(
        self, argv: list[str], timeout: float = 60.0, check: bool = False, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (``scontrol``, ``squeue``, ...) against this cluster."""
        done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=kwargs.pop("env", None) or self.env(),
            **kwargs,
        )
        if check and done.returncode != 0:
            raise SlurmError(
                f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}"
            )
        return done

    def srun(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``srun ARGS`` (its own allocation), waited for; check ``returncode`` yourself."""
        return self.run(["srun", *args], timeout=timeout, cwd=str(self.dir))

    def sbatch(self, script: str, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Submit ``script`` (a ``#!/bin/bash`` line is added when it has none) with the
        ``sbatch`` options ``args``; returns the job id. The job's output goes to
        ``jobs/<id>.out`` in the cluster's directory (:meth:`output`) unless ``args``
        say otherwise; it runs in that directory, with the environment :meth:`env` makes
        of ``env`` (default: this process's; Slurm exports it to the job)."""
        self.jobs_dir.mkdir(exist_ok=True)
        if not script.startswith("#!"):
            script = "#!/bin/bash\n" + script
        path = self.jobs_dir / f"script-{secrets.token_hex(4)}.sh"
        path.write_text(script)
        done = self.run(
            [
                "sbatch",
                "--parsable",
                f"--output={self.jobs_dir}/%j.out",
                f"--chdir={self.jobs_dir}",
                *args,
                str(path),
            ],
            timeout=30,
            check=True,
            env=self.env(env),
        )
        return done.stdout.strip().split(";")[0]

    def scancel(self, job_id: str, *args: str) -> None:
        self.run(["scancel", *args, job_id], timeout=30, check=True)

    def cancel_all(self, timeout: float = 15.0) -> None:
        """Cancel every job of the cluster and wait until none of their processes is left
        (Slurm SIGKILLs what is still alive ``KillWait``, 10 s, after the SIGTERM);
        :class:`SlurmError` naming the survivors otherwise."""
        self.run(["scancel", "--user=root"], timeout=10, check=True)
        deadline = time.monotonic() + timeout
        while left := self._job_processes():
            if time.monotonic() > deadline:
                raise SlurmError(f"jobs' processes alive {timeout:g} s after scancel: {left}")
            time.sleep(0.05)  # slurmstepd ending the jobs' processes: nothing to await

    def job(self, job_id: str) -> SlurmJob:
        """The job now (``scontrol show job -o``); finished jobs stay visible for
        ``MinJobAge`` (30 s)."""
        done = self.run(["scontrol", "show", "job", "-o", job_id], timeout=30, check=True)
        return parse_job(done.stdout.splitlines()[0])

    def wait_job(
        self, job_id: str, timeout: float = 60.0, states: frozenset[str] = TERMINAL_STATES
    ) -> SlurmJob:
        """Poll the job until its state is one of ``states`` (by default: finished, with
        no process left); :class:`SlurmError` with the job and its output after
        ``timeout`` s."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            job = self.job(job_id)
            if job.state in states:
                return job
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"job {job_id} is {job.state}, not {'/'.join(sorted(states))}, after "
                    f"{timeout:g} s ({job.fields.get('Reason')}); output:\n{self.output(job_id)}"
                )
            time.sleep(delay)  # state held by slurmctld: nothing to await but polling
            delay = min(delay * 2, 0.2)

    def job_processes(self, job_id: str) -> list[psutil.Process]:
        """The live processes of one job of this cluster (``SLURM_JOB_ID`` in their
        environment)."""
        found = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("SLURM_JOB_ID") == job_id:
                    found.append(proc)
        return found

    def release_requeued(self, job_id: str, timeout: float = 15.0) -> None:
        """Start a requeued job now instead of after its ``EligibleTime`` (2 minutes on).
        Not within the second its previous run ended: slurmd then refuses it ("Job
        credential revoked") and the job FAILs. So: wait until none of its processes is
        left and the clock is past that second, then ``scontrol update EligibleTime=now``."""

        deadline = time.monotonic() + timeout
        while self.job_processes(job_id):
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id}: processes left {timeout:g} s after requeue")
            time.sleep(0.05)  # processes of another session: nothing to await but polling
        time.sleep(max(0.0, int(time.time()) + 1.05 - time.time()))  # into the next second
        self.run(["scontrol", "update", f"JobId={job_id}", "EligibleTime=now"], check=True)

    def output(self, job_id: str) -> str:
        """The job's output file so far ('' if none yet)."""
        path = self.jobs_dir / f"{job_id}.out"
        with contextlib.suppress(SlurmError, subprocess.SubprocessError):
            path = Path(self.job(job_id).fields.get("StdOut", path))
        try:
            return path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self, tail: int = 30) -> str:
        """The last ``tail`` lines of every daemon's log, for failure messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"== {log}\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- start-up ----------------------------------------------------------------------

    def _write_config(self) -> None:
        os.chmod(self.dir, 0o755)  # munged wants its socket's directories traversable
        for sub in ("state", "spool", "log", "jobs", "munge"):
            (self.dir / sub).mkdir(mode=0o755)
        (self.dir / "munge-key").mkdir(mode=0o700)
        last = len(self.nodes)
        node_range = "n1" if last == 1 else f"n[1-{last}]"
        ports = ",".join(str(p) for p in self.node_ports)
        # Appendix of LAUNCHERS.md, with this cluster's own ports, paths, munge and names.
        self.conf.write_text(
            f"""\
ClusterName={self.name}
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
FirstJobId={self.first_job_id}
StateSaveLocation={self.dir}/state
SlurmdSpoolDir={self.dir}/spool/%n
SlurmctldPidFile={self.dir}/slurmctld.pid
SlurmdPidFile={self.dir}/slurmd.%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd.%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=30
NodeName={node_range} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports} \
CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={node_range} Default=YES MaxTime=INFINITE State=UP \
OverSubscribe=FORCE:4
"""
        )

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.stderr", "wb")  # noqa: SIM115 - the child's
        with log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=str(self.dir),
                start_new_session=True,
            )
        self.daemons[name] = proc
        return proc

    def _start_munged(self, deadline: float) -> None:
        key = self.dir / "munge-key" / "munge.key"
        subprocess.run(
            [_which("mungekey") or "mungekey", "--create", "--bits=1024", f"--keyfile={key}"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self._spawn(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.dir / 'munge' / 'munged.pid'}",
                f"--seed-file={self.dir / 'munge-key' / 'munged.seed'}",
                "--num-threads=2",
            ],
        )
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise SlurmError(f"munged made no socket; see {self.log_dir}/munged.stderr")
            time.sleep(0.01)  # an external process becoming ready: nothing to await

    def _check_alive(self) -> None:
        for name, proc in self.daemons.items():
            if proc.poll() is not None:
                log = self.log_dir / (f"{name}.log" if name != "munged" else f"{name}.stderr")
                raise SlurmError(
                    f"{name} exited with {proc.returncode} while starting; see {log}\n"
                    + self.logs()
                )

    def _await_idle(self, deadline: float) -> None:
        delay = 0.05
        states = ""
        while True:
            self._check_alive()
            done = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10)
            states = done.stdout.strip() or done.stderr.strip()
            seen = dict(line.split(None, 1) for line in done.stdout.splitlines() if " " in line)
            if done.returncode == 0 and all(seen.get(n) == "idle" for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"Slurm nodes not idle in time (sinfo: {states!r}); see "
                    f"{self.log_dir}/slurmctld.log and slurmd.n*.log\n" + self.logs()
                )
            time.sleep(delay)  # nodes registering with slurmctld: nothing to await
            delay = min(delay * 1.5, 0.2)


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ({' '.join(proc.cmdline())[:160]})"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def cluster_of(proc: psutil.Process) -> str | None:
    """The name of the test cluster ``proc`` belongs to, or None: daemons and the jobs'
    processes carry :data:`MARKER_ENV` (or ``SLURM_CLUSTER_NAME``) in their environment;
    ``slurmstepd`` clears its environment, but runs in the cluster's directory."""
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        env = proc.environ()
        name = env.get(MARKER_ENV) or env.get("SLURM_CLUSTER_NAME")
        if name is None and proc.name().startswith("slurmstepd"):
            match = _DIR_NAME.match(Path(proc.cwd()).name)
            name = match.group(1) if match else None
    except psutil.Error:
        return None
    return name if name and _NAME.fullmatch(name) else None


def sweep_leftovers() -> list[int]:
    """Kill the processes of test clusters whose starting process is gone (a session
    killed before its teardown) and remove their directories; returns the pids killed."""
    killed = []
    for proc in psutil.process_iter(["pid"]):
        match = _NAME.fullmatch(cluster_of(proc) or "")
        if match is None or psutil.pid_exists(int(match.group(1), 16)):
            continue
        with contextlib.suppress(psutil.Error):
            cwd = Path(proc.cwd())
            proc.kill()
            killed.append(proc.pid)
            if _DIR_NAME.match(cwd.name):
                shutil.rmtree(cwd, ignore_errors=True)
    return killed


def require_slurm() -> None:
    """Skip the calling test, with the reason, where a cluster cannot start; under CI
    (``CI`` set), where the Slurm tests must run, fail it instead."""
    reason = slurm_unavailable_reason()
    if reason:
        if "CI" in os.environ:
            pytest.fail(f"Slurm test cluster unavailable under CI: {reason}")
        pytest.skip(f"Slurm test cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A started :class:`SlurmCluster` of three fake nodes, one per test process for the
    whole session (each pytest-xdist worker has its own: nothing is shared between them).
    Skipped, with the reason, where Slurm cannot run, except under CI (``CI`` set), where
    the test fails instead. At teardown, also after failures, the cluster is stopped, and
    the session fails if any daemon of it or process of its jobs survived."""
    require_slurm()
    cluster = SlurmCluster()
    problems: list[str] = []
    try:
        cluster.start()
        yield cluster
    finally:
        problems = cluster.stop()
    survivors = [_describe(proc) for proc in cluster.processes()]
    assert not problems + survivors, (
        f"Slurm test cluster {cluster.name} did not stop cleanly:\n"
        + "\n".join(problems + survivors)
    )
