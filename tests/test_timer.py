"""The FIFO timer server with our worker-side client (torch's client is in the integration
tests): acquire, release, expiry, dead processes, no server; and its defences: every kind
of bad request is refused while the thread serves on (a later timer still fires), only
processes of the workers' trees and terminating signals are honoured, and the FIFO's path
is private by default and checked when configured. Hypothesis feeds random lines and
streams to the request handler."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from elastic_runner.errors import ConfigError
from elastic_runner.spec import RunContext
from elastic_runner.testing.runner import wait_for
from elastic_runner.timer import TIMER_FILE_ENV, TimerRequest, expires
from elastic_runner.timer.api import TimerExpiry
from elastic_runner.timer.server import (
    MAX_ARMED,
    TERMINATING_SIGNALS,
    FileTimerConfig,
    FileTimerServer,
    _file_server,
    descendant_of_agent,
    worker_trees,
)
from elastic_runner.workers.guardian import Guardian
from elastic_runner.workers.tree import MARKER_ENV

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to nobody needs root")


def this_process_or_its_children(pid: int) -> bool:
    """The unit tests' workers: this process (``expires`` in the test) and its children."""
    return pid == os.getpid() or descendant_of_agent(pid)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileTimerServer]:
    s = FileTimerServer(str(tmp_path / "timer.fifo"), is_ours=this_process_or_its_children)
    s.start()
    monkeypatch.setenv(TIMER_FILE_ENV, s.path)
    yield s
    s.stop()
    assert not os.path.exists(s.path)  # the server removed the FIFO it made


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def listen(server: FileTimerServer) -> queue.Queue[TimerExpiry]:
    got: queue.Queue[TimerExpiry] = queue.Queue()
    server.on_expired(got.put)
    return got


def write(path: str, data: bytes) -> None:
    """One write on the FIFO, as a client does it."""
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _send(path: str, request: TimerRequest) -> None:
    write(path, (request.to_json() + "\n").encode())


def assert_still_serving(server: FileTimerServer, got: queue.Queue[TimerExpiry]) -> None:
    """The thread is alive and a new timer fires at its deadline."""
    assert server._thread is not None and server._thread.is_alive()
    scope = f"later-{uuid.uuid4().hex[:6]}"
    with expires(after=0.05, scope=scope):
        expiry = got.get(timeout=5)
    assert (expiry.pid, expiry.scope) == (os.getpid(), scope)


def request(**fields: Any) -> bytes:
    """A well-formed request for this process, with ``fields`` changed (None: left out)."""
    base: dict[str, Any] = {
        "version": 1,
        "pid": os.getpid(),
        "scope_id": "attack",
        "expiration_time": time.time() + 0.05,
        "signal": 9,
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


# -- the protocol -------------------------------------------------------------------------


def test_a_released_timer_never_fires(server: FileTimerServer) -> None:
    got = listen(server)
    with expires(after=0.3, scope="quick"):
        pass
    with pytest.raises(queue.Empty):
        got.get(timeout=0.6)
    assert server.requests == 2 and server.refused == 0


def test_an_expired_timer_is_reported_once_with_its_scope(
    server: FileTimerServer, sleeper: subprocess.Popen[bytes]
) -> None:
    got = listen(server)
    t0 = time.monotonic()
    _send(server.path, TimerRequest(sleeper.pid, "train_step", time.time() + 0.3, 9))
    _send(server.path, TimerRequest(sleeper.pid, "other", time.time() + 0.35, 9))
    expiry = got.get(timeout=5)
    assert 0.25 < time.monotonic() - t0 < 2  # at its deadline, not polled late
    assert (expiry.pid, expiry.scope, expiry.signal) == (sleeper.pid, "train_step", 9)
    assert 0.2 < expiry.after < 0.5
    with pytest.raises(queue.Empty):  # the process's other timers went with it
        got.get(timeout=0.5)
    assert sleeper.poll() is None  # the server itself kills nothing


def test_timers_of_a_process_that_exited_are_dropped(server: FileTimerServer) -> None:
    got = listen(server)
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    _send(server.path, TimerRequest(gone.pid, "s", time.time() + 0.6, 9))
    gone.wait()
    with pytest.raises(queue.Empty):
        got.get(timeout=1)
    assert server.refused == 0  # it was ours when armed


def test_no_server_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "nobody.fifo"
    os.mkfifo(path)
    monkeypatch.setenv(TIMER_FILE_ENV, str(path))
    with pytest.raises(BrokenPipeError, match="no timer server reads"), expires(after=1):
        pass


def test_expires_does_nothing_outside_elastic_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TIMER_FILE_ENV, raising=False)
    with expires(after=0.01):
        time.sleep(0.02)


def test_default_scope_names_the_caller(server: FileTimerServer) -> None:
    got = listen(server)

    def training_loop() -> str:
        with expires(after=0.1):
            return got.get(timeout=5).scope

    assert training_loop().endswith("test_timer.py#training_loop")


def test_our_client_says_how_long_it_armed_for(server: FileTimerServer) -> None:
    got = listen(server)
    with expires(after=0.2, scope="told"):
        assert got.get(timeout=5).after == 0.2


# -- bad requests: refused, and the thread serves on ---------------------------------------

BIG = "x" * 3000
BAD_LINES: dict[str, bytes] = {
    "not JSON": b"not json",
    "not UTF-8": b'{"pid": "\xff\xfe"}',
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"pid"',
    "null": b"null",
    "fields missing": b'{"pid": 1}',
    "nested JSON": request(pid={"a": [1, {"b": 2}]}, scope_id=["x"]),
    "nested too deeply": b"[" * 3000 + b"]" * 1000,
    "version 2": request(version=2),
    "expiration 1e300": request(expiration_time=1e300),
    "expiration Infinity": request(expiration_time=math.inf),
    "expiration -Infinity": request(expiration_time=-math.inf),
    "expiration NaN": request(expiration_time=math.nan),
    "expiration 10**400": request(expiration_time=10**400),
    "expiration a string": request(expiration_time="soon"),
    "expiration true": request(expiration_time=True),
    "pid 0": request(pid=0),
    "pid -1": request(pid=-1),
    "pid 2**31": request(pid=2**31),
    "pid 2**63": request(pid=2**63),
    "pid 10**300": request(pid=10**300),
    "pid a string": request(pid=str(os.getpid())),
    "pid a float": request(pid=float(os.getpid())),
    "pid true": request(pid=True),
    "scope a list": request(scope_id=["a"]),
    "scope overlong": request(scope_id=BIG),
    "scope with a newline": request(scope_id="a\nWARNING forged log line"),
    "signal 99999": request(signal=99999),
    "signal 2**63": request(signal=2**63),
    "signal -9": request(signal=-9),
    "signal 19 (SIGSTOP)": request(signal=signal.SIGSTOP),
    "signal 18 (SIGCONT)": request(signal=signal.SIGCONT),
    "signal 20 (SIGTSTP)": request(signal=signal.SIGTSTP),
    "signal 17 (SIGCHLD)": request(signal=signal.SIGCHLD),
    "signal a string": request(signal="SIGKILL"),
    "signal a float": request(signal=9.0),
    "no signal": request(signal=None),
    "after NaN": request(after=math.nan),
    "after negative": request(after=-1),
    "after a string": request(after="1"),
    "pid 1 (not ours)": request(pid=1),
    "over PIPE_BUF": request(scope_id="y" * 5000),
}


@pytest.mark.parametrize("line", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_a_bad_request_is_refused_and_a_later_timer_still_fires(
    server: FileTimerServer, line: bytes
) -> None:
    got = listen(server)
    write(server.path, line + b"\n")
    # (>= 1: a line over PIPE_BUF may reach the reader in two pieces)
    wait_for(lambda: server.refused >= 1, timeout=5, what="the request refused")
    time.sleep(0.1)  # a refused timer would have fired by now
    assert got.empty()
    assert_still_serving(server, got)
    assert not server._failed_once  # refused cleanly: no unexpected error on the way


def test_a_burst_of_bad_requests_is_one_warning(
    server: FileTimerServer, caplog: pytest.LogCaptureFixture
) -> None:
    got = listen(server)
    with caplog.at_level(logging.WARNING, logger="elastic_runner.timer.server"):
        for line in BAD_LINES.values():
            write(server.path, line + b"\n")
        wait_for(lambda: server.refused >= len(BAD_LINES), timeout=5)
        assert_still_serving(server, got)
        server.stop()
    refusals = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert len(refusals) == 1, refusals  # rate-limited: one line, then a count
    assert refusals[0].startswith("timer server: refused a request (not JSON")
    assert f"timer server: {server.refused - 1} more bad timer requests refused" in caplog.text
    assert "Traceback" not in caplog.text


def test_an_unterminated_write_cannot_corrupt_the_next_request(
    server: FileTimerServer,
) -> None:
    got = listen(server)
    write(server.path, b'{"pid": ')  # no newline: a broken client
    wait_for(lambda: server.refused == 1, timeout=5, what="the tail dropped")
    assert_still_serving(server, got)


def test_an_endless_line_is_dropped_without_holding_it(server: FileTimerServer) -> None:
    got = listen(server)
    fd = os.open(server.path, os.O_WRONLY)
    try:
        for _ in range(64):  # 4 MiB without a newline, in pieces the reader sees apart
            os.write(fd, b"z" * 65536)
        os.write(fd, b"\n")
    finally:
        os.close(fd)
    wait_for(lambda: server.refused >= 1, timeout=5)
    assert len(server._pending) < 65536 * 2
    assert_still_serving(server, got)
    # (refused once per stretch the reader found between the writer's pieces: each
    # drained FIFO starts a fresh line)


def test_a_listener_that_raises_does_not_stop_the_thread(
    server: FileTimerServer, caplog: pytest.LogCaptureFixture
) -> None:
    got: queue.Queue[TimerExpiry] = queue.Queue()
    calls: list[TimerExpiry] = []

    def listener(expiry: TimerExpiry) -> None:
        calls.append(expiry)
        if len(calls) == 1:
            raise RuntimeError("the agent's callback broke")
        got.put(expiry)

    server.on_expired(listener)
    with expires(after=0.05, scope="first"):
        wait_for(lambda: calls, timeout=5)
    assert_still_serving(server, got)
    assert "unexpected error reporting an expiry" in caplog.text


def test_an_unexpected_error_in_the_loop_is_logged_once_and_serving_goes_on(
    server: FileTimerServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = listen(server)
    feed = server._feed
    failures: list[bytes] = []

    def broken_once(chunk: bytes) -> None:
        if not failures:
            failures.append(chunk)
            raise MemoryError("a bug in the reader")
        feed(chunk)

    monkeypatch.setattr(server, "_feed", broken_once)
    write(server.path, b"anything\n")
    wait_for(lambda: failures, timeout=5)
    assert_still_serving(server, got)
    assert caplog.text.count("unexpected error in the serve loop") == 1
    assert "MemoryError: a bug in the reader" in caplog.text  # its traceback, once


def test_a_pid_check_that_raises_refuses_the_request(tmp_path: Path) -> None:
    def broken(pid: int) -> bool:
        raise psutil.AccessDenied(pid)

    s = FileTimerServer(str(tmp_path / "f"), clock=lambda: 100.0, is_ours=broken)
    try:
        s.handle(request(expiration_time=101.0))
        assert s.refused == 1 and s._timers == {}
    finally:
        s.stop()


def test_a_far_deadline_is_allowed_and_does_not_block_a_near_one(
    server: FileTimerServer,
) -> None:
    got = listen(server)
    write(server.path, request(scope_id="far", expiration_time=time.time() + 300 * 86400) + b"\n")
    assert_still_serving(server, got)
    wait_for(lambda: server.requests == 3, timeout=5)  # far, later, its release
    assert server.refused == 0


def test_timers_per_process_are_capped(tmp_path: Path) -> None:
    s = FileTimerServer(str(tmp_path / "f"), clock=lambda: 100.0, is_ours=lambda pid: True)
    try:
        for i in range(1100):
            s.handle(request(pid=42, scope_id=f"s{i}", expiration_time=200.0))
        assert len(s._timers) == 1024 and s.refused == 1100 - 1024
        s.handle(request(pid=42, scope_id="s1", expiration_time=-1))  # a release frees one
        s.handle(request(pid=42, scope_id="new", expiration_time=200.0))
        assert (42, "new") in s._timers and s.refused == 1100 - 1024
    finally:
        s.stop()


# -- pids and signals ----------------------------------------------------------------------


def test_only_the_agents_descendants_are_honoured_by_default(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    """The default check: a live descendant of this process (the agent)."""
    grandchild_file = tmp_path / "grandchild"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(grandchild_file)!r}, 'w').write(str(c.pid)); time.sleep(60)",
        ]
    )
    try:
        wait_for(lambda: grandchild_file.exists() and grandchild_file.read_text(), timeout=10)
        grandchild = int(grandchild_file.read_text())
        assert descendant_of_agent(sleeper.pid) and descendant_of_agent(grandchild)
        for stranger in (os.getpid(), os.getppid(), 1, 2**22 + 12345):
            assert not descendant_of_agent(stranger)
    finally:
        parent.kill()
        parent.wait()


def test_worker_trees_want_the_workers_marker(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    code = "import time; time.sleep(60)"
    marked = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, MARKER_ENV: marker})
    other = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, MARKER_ENV: "x"})
    try:
        wait_for(lambda: psutil.Process(marked.pid).environ().get(MARKER_ENV) == marker)
        wait_for(lambda: psutil.Process(other.pid).environ().get(MARKER_ENV) == "x")
        is_ours = worker_trees(marker)
        assert is_ours(marked.pid)
        assert not is_ours(other.pid)  # a helper of the agent, or another agent's worker
        assert not is_ours(os.getpid()) and not is_ours(1)
    finally:
        for proc in (marked, other):
            proc.kill()
            proc.wait()
    assert not is_ours(marked.pid)  # gone


def test_a_timer_for_a_process_outside_the_workers_trees_is_refused(
    server: FileTimerServer, caplog: pytest.LogCaptureFixture
) -> None:
    got = listen(server)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        server.accept_pids(lambda pid: pid == os.getpid())  # the stranger is no worker
        write(server.path, request(pid=stranger.pid) + b"\n" + request(pid=1) + b"\n")
        wait_for(lambda: server.refused == 2, timeout=5)
        assert f"pid {stranger.pid} is not a live process of this job's workers" in caplog.text
        assert_still_serving(server, got)
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGABRT, 0]
)
def test_terminating_signals_and_report_only_are_honoured(
    server: FileTimerServer, sig: int
) -> None:
    got = listen(server)
    write(server.path, request(signal=int(sig)) + b"\n")
    assert got.get(timeout=5).signal == sig


def test_the_allowed_signals_all_end_a_process() -> None:
    stop_or_ignore = {
        signal.SIGSTOP,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGCONT,
        signal.SIGCHLD,
        signal.SIGURG,
        signal.SIGWINCH,
    }
    assert not TERMINATING_SIGNALS & stop_or_ignore
    assert {signal.SIGKILL, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP} <= TERMINATING_SIGNALS


# -- the FIFO's path -----------------------------------------------------------------------


@pytest.fixture
def context(tmp_path: Path) -> RunContext:
    return RunContext("predictable-id", tmp_path / "run", "node")


def build(path: str | None, context: RunContext) -> FileTimerServer:
    return _file_server(FileTimerConfig(path=path), context)


def test_the_default_fifo_is_in_a_private_directory(
    context: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TIMER_FILE_ENV, raising=False)
    s = build(None, context)
    directory = os.path.dirname(s.path)
    try:
        assert os.path.basename(directory).startswith("elastic-runner-timer-")
        assert "predictable-id" not in s.path
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
        st = os.lstat(s.path)
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert s.owned_paths == (s.path, directory)
        s.start()
        assert s.worker_env() == {TIMER_FILE_ENV: s.path}
    finally:
        s.stop()
    assert not os.path.exists(s.path) and not os.path.exists(directory)
    other = build(None, context)  # another run of the same id: another directory
    other.stop()
    assert other.path != s.path


def test_a_configured_path_is_made_private_and_removed(tmp_path: Path, context: RunContext) -> None:
    path = tmp_path / "mine.fifo"
    s = build(str(path), context)
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600 and s.owned_paths == (str(path),)
    s.start()
    s.stop()
    assert not path.exists()


def test_an_existing_fifo_of_ours_is_used_and_left_in_place(
    tmp_path: Path, context: RunContext
) -> None:
    path = tmp_path / "kept.fifo"
    os.mkfifo(path, 0o644)
    s = build(str(path), context)
    assert s.owned_paths == ()
    s.start()
    s.stop()
    assert stat.S_ISFIFO(path.lstat().st_mode)


@needs_root
def test_a_fifo_planted_by_another_user_is_refused(tmp_path: Path, context: RunContext) -> None:
    path = tmp_path / "planted.fifo"
    os.mkfifo(path, 0o600)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as err:
        build(str(path), context)
    assert str(err.value) == (
        f"timer.path={path}: is owned by uid {NOBODY} (nobody), not by this user (uid 0 "
        "(root)): its owner could read or forge timer requests; use a FIFO of your own, or "
        "leave timer.path unset"
    )


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_fifo_others_may_write_is_refused(tmp_path: Path, context: RunContext, mode: int) -> None:
    path = tmp_path / "open.fifo"
    os.mkfifo(path)
    os.chmod(path, mode)
    with pytest.raises(ConfigError, match=rf"is writable by other users \(mode 0{mode:o}\)"):
        build(str(path), context)


def test_a_symlink_is_refused_even_to_our_own_fifo(tmp_path: Path, context: RunContext) -> None:
    fifo = tmp_path / "real.fifo"
    os.mkfifo(fifo, 0o600)
    link = tmp_path / "link.fifo"
    link.symlink_to(fifo)
    with pytest.raises(ConfigError, match=r"link\.fifo: is a symbolic link"):
        build(str(link), context)


def test_a_dangling_symlink_is_one_clear_error(tmp_path: Path, context: RunContext) -> None:
    link = tmp_path / "dangling.fifo"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as err:
        build(str(link), context)
    assert str(err.value) == (
        f"timer.path={link}: is a symbolic link; give the FIFO's own path, or leave "
        "timer.path unset"
    )
    assert not (tmp_path / "nowhere").exists()  # nothing made through it


def test_a_regular_file_or_a_missing_directory_is_refused(
    tmp_path: Path, context: RunContext
) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a FIFO"):
        build(str(tmp_path / "file"), context)
    with pytest.raises(ConfigError, match=r"directory .*/nope does not exist"):
        build(str(tmp_path / "nope" / "f"), context)


@needs_root
def test_an_inherited_timer_file_is_checked_too(
    tmp_path: Path, context: RunContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "inherited.fifo"
    os.mkfifo(path, 0o600)
    os.chown(path, NOBODY, NOBODY)
    monkeypatch.setenv(TIMER_FILE_ENV, str(path))
    with pytest.raises(ConfigError, match=rf"^{TIMER_FILE_ENV}=.*is owned by uid {NOBODY}"):
        build(None, context)


@needs_root
def test_a_fifo_swapped_after_the_check_is_refused_at_start(
    tmp_path: Path, context: RunContext
) -> None:
    path = tmp_path / "swapped.fifo"
    os.mkfifo(path, 0o600)
    s = build(str(path), context)
    os.chown(path, NOBODY, NOBODY)  # between the factory's check and the open
    try:
        with pytest.raises(ConfigError, match="is owned by uid 65534"):
            s.start()
        assert s._thread is None
    finally:
        s.stop()


def test_the_guardian_removes_the_fifo_of_a_dead_agent(tmp_path: Path) -> None:
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    fifo = directory / "timer.fifo"
    os.mkfifo(fifo, 0o600)
    g = Guardian(uuid.uuid4().hex, "test-run", remove=[str(fifo), str(directory)])
    g._proc.stdin.close()  # type: ignore[union-attr]  # the agent's end, as at its death
    g._proc.wait(timeout=20)
    assert not fifo.exists() and not directory.exists()


def test_a_guardian_let_go_removes_nothing(tmp_path: Path) -> None:
    fifo = tmp_path / "timer.fifo"
    os.mkfifo(fifo, 0o600)
    g = Guardian(uuid.uuid4().hex, "test-run", remove=[str(fifo)])
    g.close()  # a clean exit: the agent removes its FIFO itself
    assert fifo.exists()


# -- fuzzing the handler -----------------------------------------------------------------

OURS = 31337
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
NOW = 1_000_000.0
SIGNALS = st.sampled_from([0, 9, 15, 19, 18, 99999, 2**63, -9, 1, 64, 65])
REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([1, 2, "1", None, True]) | JSON_VALUES,
        "pid": st.integers(min_value=-(2**64), max_value=2**64) | JSON_VALUES,
        "scope_id": st.text(max_size=50) | JSON_VALUES,
        "expiration_time": st.floats(min_value=-10.0, max_value=NOW + 2 * MAX_ARMED)
        | st.sampled_from([1e300, math.inf, -math.inf, math.nan, -1, NOW + 1, 10**400])
        | JSON_VALUES,
        "signal": SIGNALS | JSON_VALUES,
        "after": st.floats(allow_nan=True, allow_infinity=True) | JSON_VALUES,
        "extra": JSON_VALUES,
    },
)


#: Near misses: every field present and mostly sound, so that many get armed and fire.
PLAUSIBLE = st.fixed_dictionaries(
    {
        "version": st.just(1),
        "pid": st.integers(min_value=1, max_value=2**31 // 7).map(lambda n: n * 7)
        | st.sampled_from([0, -7, 2**31, 2**63, 7.0]),
        "scope_id": st.text(max_size=30),
        "expiration_time": st.floats(min_value=-10.0, max_value=NOW + 2 * MAX_ARMED)
        | st.sampled_from([math.inf, math.nan, 1e300]),
        "signal": SIGNALS,
    },
    optional={"after": st.floats(min_value=-1.0, max_value=2 * MAX_ARMED) | st.just(math.nan)},
)


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity as JavaScript literals, as a worker might


LINES = (
    st.binary(max_size=400).map(lambda b: b.replace(b"\n", b""))
    | REQUESTS.map(_encode)
    | PLAUSIBLE.map(_encode)
)


class Fuzzed:
    """A server not started (its handler driven directly), on a clock the test moves,
    honouring any pid divisible by 7 (so random requests get armed and fire too)."""

    def __init__(self) -> None:
        self.now = NOW
        self.expiries: list[TimerExpiry] = []
        self.server = FileTimerServer(
            "/nonexistent/fuzz.fifo", clock=lambda: self.now, is_ours=lambda pid: pid % 7 == 0
        )
        self.server.on_expired(self.expiries.append)

    def still_fires(self) -> None:
        """A later well-formed timer fires, and every expiry ever reported is sound."""
        s = self.server
        assert not s._failed_once  # every bad input was refused, none raised inside
        self.now = NOW + 4 * MAX_ARMED  # past every timer armed so far
        s.handle(request(pid=OURS * 7, scope_id="sentinel", expiration_time=self.now - 1))
        s._expire()
        assert [(e.pid, e.scope) for e in self.expiries if e.pid == OURS * 7] == [
            (OURS * 7, "sentinel")
        ]
        for e in self.expiries:
            assert 0 < e.pid < 2**31 and e.pid % 7 == 0
            assert e.signal == 0 or e.signal in TERMINATING_SIGNALS
            assert math.isfinite(e.after) and 0 <= e.after <= MAX_ARMED
            assert isinstance(e.scope, str) and "\n" not in e.scope
        assert s._timers == {} and s._per_pid == {}
        s.stop()


def _not_about_the_sentinel(line: bytes) -> bool:
    return str(OURS * 7).encode() not in line


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINES, max_size=12), ticks=st.lists(st.floats(0, 2 * MAX_ARMED)))
def test_random_lines_never_raise_nor_stop_a_later_timer(
    lines: list[bytes], ticks: list[float]
) -> None:
    assume(all(_not_about_the_sentinel(line) for line in lines))
    fuzz = Fuzzed()
    for i, line in enumerate(lines):
        fuzz.server.handle(line)
        if i < len(ticks):  # time passes between requests: some expire
            fuzz.now = NOW + ticks[i]
            fuzz.server._expire()
    fuzz.now = NOW
    fuzz.still_fires()


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(LINES, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=6),
    tail=st.binary(max_size=6000),
)
def test_random_streams_never_raise_nor_stop_a_later_timer(
    lines: list[bytes], cuts: list[int], tail: bytes
) -> None:
    """Bytes as the reader gets them: cut anywhere, overlong lines, an unterminated tail."""
    stream = b"\n".join(lines) + b"\n" + tail
    assume(_not_about_the_sentinel(stream))
    fuzz = Fuzzed()
    start = 0
    for cut in sorted(cuts):
        fuzz.server._feed(stream[start:cut])
        start = max(start, cut)
    fuzz.server._feed(stream[start:])
    fuzz.server._drained()  # the FIFO ran dry: a tail without its newline is dropped
    assert fuzz.server._pending == b""
    fuzz.still_fires()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(lines=st.lists(LINES, min_size=1, max_size=10))
def test_random_writes_through_the_fifo_leave_the_thread_serving(
    tmp_path: Path, lines: list[bytes]
) -> None:
    s = FileTimerServer(str(tmp_path / f"{uuid.uuid4().hex}.fifo"), is_ours=_only_me)
    got = listen(s)
    s.start()
    try:
        for line in lines:
            write(s.path, line[:4000] + b"\n")
        _send(s.path, TimerRequest(os.getpid(), "sentinel", time.time() + 0.02, 9))
        while got.get(timeout=5).scope != "sentinel":
            pass
        assert s._thread is not None and s._thread.is_alive()
    finally:
        s.stop()


def _only_me(pid: int) -> bool:
    return pid == os.getpid()


def test_thread_names_and_fds_are_released(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    s = FileTimerServer(str(tmp_path / "f"), is_ours=_only_me)
    s.start()
    s.stop()
    s.stop()  # twice is fine
    assert set(os.listdir("/proc/self/fd")) == before
    assert not any(t.name == "timer-server" for t in threading.enumerate())
