"""The FIFO timer server with our worker-side client (torch's client is in the integration
tests): acquire, release, expiry, dead processes, malformed requests, no server."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic_runner.timer import TIMER_FILE_ENV, TimerRequest, expires
from elastic_runner.timer.api import TimerExpiry
from elastic_runner.timer.server import FileTimerServer


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileTimerServer]:
    s = FileTimerServer(str(tmp_path / "timer.fifo"))
    s.start()
    monkeypatch.setenv(TIMER_FILE_ENV, s.path)
    yield s
    s.stop()
    assert not os.path.exists(s.path)  # the server removed the FIFO it made


def listen(server: FileTimerServer) -> queue.Queue[TimerExpiry]:
    got: queue.Queue[TimerExpiry] = queue.Queue()
    server.on_expired(got.put)
    return got


def test_a_released_timer_never_fires(server: FileTimerServer) -> None:
    got = listen(server)
    with expires(after=0.3, scope="quick"):
        pass
    with pytest.raises(queue.Empty):
        got.get(timeout=0.6)
    assert server.requests == 2


def test_an_expired_timer_is_reported_once_with_its_scope(server: FileTimerServer) -> None:
    got = listen(server)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
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
    finally:
        sleeper.kill()
        sleeper.wait()


def test_timers_of_a_process_that_exited_are_dropped(server: FileTimerServer) -> None:
    got = listen(server)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _send(server.path, TimerRequest(gone.pid, "s", time.time() + 0.1, 9))
    with pytest.raises(queue.Empty):
        got.get(timeout=0.5)


def test_malformed_requests_are_ignored(server: FileTimerServer) -> None:
    got = listen(server)
    fd = os.open(server.path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, b'not json\n{"pid": 1}\n')
    os.close(fd)
    with expires(after=0.2, scope="after garbage"):
        expiry = got.get(timeout=5)
    assert expiry.scope == "after garbage" and expiry.pid == os.getpid()
    assert expiry.after == 0.2  # our client says how long it armed for


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


def _send(path: str, request: TimerRequest) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fd, (request.to_json() + "\n").encode())
    os.close(fd)
