"""Cgroup containment (:mod:`elastic_runner.workers.cgroup`): finding the agent's cgroup
from ``/proc``, saying once why there is none, and, where this machine lets a process make
cgroups (v2, writable), killing every process of an attempt however it escaped: a new
session, a cleared environment, a double fork, a fork loop; with ``cgroup.kill`` and
without it (freeze, then SIGKILL each pid)."""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic_runner.workers import cgroup as cg
from elastic_runner.workers.cgroup import CgroupUnavailable, RunCgroup, kill, locate, procs
from elastic_runner.workers.guardian import Guardian


@functools.cache
def unavailable() -> str | None:
    """Why cgroup containment cannot be used on this machine (``None``: it can)."""
    try:
        RunCgroup.create(f"elastic-run-test.{os.getpid()}.{uuid.uuid4().hex[:8]}").close()
    except CgroupUnavailable as exc:
        return str(exc)
    return None


def needs_cgroups() -> pytest.MarkDecorator:
    why = unavailable()
    return pytest.mark.skipif(
        why is not None, reason=f"cgroup containment is unavailable on this machine: {why}"
    )


@pytest.fixture
def run_cgroup() -> Iterator[RunCgroup]:
    cgroup = RunCgroup.create(f"elastic-run-test.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    yield cgroup
    cgroup.close()
    assert not cgroup.path.exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids: list[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)
    return not any(_alive(p) for p in pids)


def _start_in(leaf: Path, script: str) -> tuple[subprocess.Popen[str], list[int]]:
    """``sh -c script`` moved into ``leaf`` before exec (as the supervisor does); the pids
    it prints, one a line, until ``ready``."""
    fd = os.open(leaf / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)

    def enter() -> None:
        os.write(fd, b"0")

    try:
        sh = subprocess.Popen(
            ["sh", "-c", script], stdout=subprocess.PIPE, text=True, preexec_fn=enter
        )
    finally:
        os.close(fd)
    assert sh.stdout is not None
    pids = []
    for line in sh.stdout:
        if line.strip() == "ready":
            break
        pids.append(int(line))
    for pid in pids:  # until each has become ``sleep`` (through env and setsid)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"sleep":
            assert time.monotonic() < deadline, f"pid {pid} never ran sleep"
            time.sleep(0.005)
    return sh, pids


#: A background job that clears its environment and leaves the session (the attack), and
#: one that double-forks away from ``sh`` too.
ESCAPE = (
    "env -i setsid sleep 300 & echo $!; "
    "(env -i setsid sleep 300 & echo $!) ; "
    "echo ready; exec sleep 300"
)


# -- where the agent's cgroup is: /proc/self/cgroup and mountinfo ------------------------

HYBRID = """\
27 22 0:25 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
28 27 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
30 27 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""
UNIFIED = (
    "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n"
)


def test_locate_on_a_hybrid_host() -> None:
    proc = "4:memory:/process_api/x\n0::/user.slice/session-1.scope\n"
    assert locate(proc, HYBRID) == Path("/sys/fs/cgroup/unified/user.slice/session-1.scope")


def test_locate_on_a_unified_host_and_in_a_container_namespace() -> None:
    assert locate("0::/\n", UNIFIED) == Path("/sys/fs/cgroup")
    assert locate("0::/a/b\n", UNIFIED) == Path("/sys/fs/cgroup/a/b")
    # a bind mount of a sub-tree (the mount's root is not the hierarchy's root)
    bound = "40 1 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert locate("0::/kubepods/pod1/c1\n", bound) == Path("/sys/fs/cgroup/c1")
    assert locate("0::/kubepods/pod1\n", bound) == Path("/sys/fs/cgroup")
    # a mount point with a space, as mountinfo escapes it
    spaced = "41 1 0:30 / /mnt/cg\\040two rw - cgroup2 none rw\n"
    assert locate("0::/x\n", spaced) == Path("/mnt/cg two/x")


@pytest.mark.parametrize(
    ("proc", "mountinfo", "why"),
    [
        ("1:name=systemd:/\n", UNIFIED, "no cgroup v2 hierarchy"),
        ("0::/\n", HYBRID.replace("cgroup2", "cgroup"), "cgroup2 is not mounted"),
        ("0::/\n", UNIFIED.replace("relatime shared", "ro,relatime shared"), "read-only"),
        ("0::/../../x\n", UNIFIED, "outside its namespace"),
        (
            "0::/elsewhere\n",
            "40 1 0:30 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
            "under no cgroup2 mount",
        ),
    ],
)
def test_locate_says_why_there_is_no_cgroup(proc: str, mountinfo: str, why: str) -> None:
    with pytest.raises(CgroupUnavailable, match=why):
        locate(proc, mountinfo)


# -- refusals, and the one line that says so ---------------------------------------------


def test_a_directory_that_is_not_a_cgroup_is_refused_and_left_clean(tmp_path: Path) -> None:
    with pytest.raises(CgroupUnavailable, match="cannot move a process into a cgroup"):
        RunCgroup.create("run", parent=tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CgroupUnavailable, match="cannot create a cgroup in"):
        RunCgroup.create("run", parent=tmp_path / "missing")


def test_no_cgroup_is_said_once_at_info_level(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nowhere() -> Path:
        raise CgroupUnavailable("cgroup2 is not mounted (no cgroup2 in /proc/self/mountinfo)")

    monkeypatch.delenv(cg.DISABLE_ENV, raising=False)
    monkeypatch.setattr(cg, "own_cgroup", nowhere)
    with caplog.at_level(logging.DEBUG, logger=cg.__name__):
        assert cg.contain("elastic-run-test.x") is None
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.INFO,
            "cgroup containment unavailable (cgroup2 is not mounted (no cgroup2 in "
            "/proc/self/mountinfo)); leftover processes are found by the ELASTIC_RUNNER_AGENT "
            "marker only, so one that clears its environment and calls setsid can outlive "
            "the run",
        )
    ]


def test_it_can_be_turned_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cg.DISABLE_ENV, "0")
    with caplog.at_level(logging.INFO, logger=cg.__name__):
        assert cg.contain("elastic-run-test.x") is None
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("ELASTIC_RUNNER_CGROUP=0: no cgroup")


# -- for real, where this machine allows ----------------------------------------------------


@needs_cgroups()
def test_the_run_cgroup_is_a_child_of_the_agents_own(run_cgroup: RunCgroup) -> None:
    assert run_cgroup.path.parent == cg.own_cgroup()
    assert (run_cgroup.path / "cgroup.procs").read_text() == ""  # no process of its own
    assert [p.name for p in run_cgroup.path.iterdir() if p.is_dir()] == []  # probe removed


@needs_cgroups()
def test_end_of_attempt_kills_what_left_its_session_and_environment(
    run_cgroup: RunCgroup,
) -> None:
    sh, escaped = _start_in(run_cgroup.worker(1, 0), ESCAPE)
    for pid in escaped:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert environ == b"" and os.getsid(pid) == pid  # no marker, no session to reach
    assert sorted(procs(run_cgroup.path)) == sorted([sh.pid, *escaped])
    assert run_cgroup.end_attempt(1) == []
    sh.wait(timeout=5)
    assert _gone(escaped)
    assert not (run_cgroup.path / "attempt-1").exists()
    assert run_cgroup.path.exists()  # the run's goes at close


@needs_cgroups()
@pytest.mark.parametrize("use_kill_file", [True, False], ids=["cgroup.kill", "freeze+kill"])
def test_kill_wins_over_a_fork_loop(run_cgroup: RunCgroup, use_kill_file: bool) -> None:
    leaf = run_cgroup.worker(1, 0)
    loop = "echo ready; i=0; while [ $i -lt 2000 ]; do sleep 300 & i=$((i+1)); done; wait"
    sh, _ = _start_in(leaf, loop)
    deadline = time.monotonic() + 10
    while len(procs(leaf)) < 20:  # let it fork a while: it forks on while we kill
        assert time.monotonic() < deadline
        time.sleep(0.005)
    found, stuck = kill(leaf.parent, use_kill_file=use_kill_file)
    assert stuck == [] and len(found) >= 20
    sh.wait(timeout=5)
    assert _gone(found)
    assert procs(leaf.parent) == []
    if not use_kill_file and (leaf.parent / "cgroup.freeze").exists():
        assert (leaf.parent / "cgroup.freeze").read_text().strip() == "0"  # thawed after


@needs_cgroups()
def test_the_guardian_kills_the_run_cgroup_when_the_agent_dies(run_cgroup: RunCgroup) -> None:
    guardian = Guardian(uuid.uuid4().hex, "test-run", cgroup=str(run_cgroup.path))
    sh, escaped = _start_in(run_cgroup.worker(1, 0), ESCAPE)
    assert guardian._proc.stdin is not None
    guardian._proc.stdin.close()  # end of file without "done": the agent died
    guardian._proc.wait(timeout=20)
    sh.wait(timeout=5)
    assert _gone(escaped)
    assert not run_cgroup.path.exists()


@needs_cgroups()
def test_memory_max_is_each_workers_job_limits_memory(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(cg.DISABLE_ENV, raising=False)
    limit = 256 * 2**20
    with caplog.at_level(logging.INFO, logger=cg.__name__):
        cgroup = cg.contain(f"elastic-run-test.{os.getpid()}.{uuid.uuid4().hex[:8]}", limit)
    assert cgroup is not None
    try:
        if cgroup.memory_max is None:
            controllers = (cgroup.path / "cgroup.controllers").read_text().split()
            assert "memory" not in controllers
            assert "job.limits.memory is enforced by sampling only" in caplog.text
            pytest.skip(
                f"the memory controller is not available to {cgroup.path} "
                f"(its cgroup.controllers: {' '.join(controllers) or 'none'})"
            )
        leaf = cgroup.worker(1, 0)
        assert (leaf / "memory.max").read_text().strip() == str(limit)
        assert caplog.text == ""
    finally:
        cgroup.close()
