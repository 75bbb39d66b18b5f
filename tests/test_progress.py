"""``elastic_runner.heartbeat(step=...)``: the wire format both ends speak, a worker
process writing to a real pipe, and the step held back by the rate limit sent at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from hypothesis import given
from hypothesis import strategies as st

from elastic_runner.progress import HEARTBEAT_FD_ENV, HEARTBEAT_INTERVAL_ENV, read_steps


def test_read_steps_takes_the_largest_and_keeps_an_unfinished_message() -> None:
    assert read_steps(b"hs3\nhhs12\ns7\ns4") == (12, b"s4")
    assert read_steps(b"s4" + b"2\n") == (42, b"")
    assert read_steps(b"hhh") == (None, b"")
    assert read_steps(b"s-1\n") == (-1, b"")


@given(st.binary(max_size=200))
def test_read_steps_never_fails_on_garbage(data: bytes) -> None:
    step, rest = read_steps(data)
    assert step is None or isinstance(step, int)
    assert len(rest) <= 32


@given(st.lists(st.integers(min_value=0, max_value=2**63), min_size=1), st.integers(1, 7))
def test_any_split_of_the_stream_gives_the_furthest_step(steps: list[int], cut: int) -> None:
    stream = b"".join(b"h" + b"s%d\n" % s for s in steps)
    furthest, rest = None, b""
    for i in range(0, len(stream), cut):
        found, rest = read_steps(rest + stream[i : i + cut])
        if found is not None:
            furthest = found if furthest is None else max(furthest, found)
    assert furthest == max(steps) and rest == b""


WORKER = textwrap.dedent(
    """
    import sys
    from elastic_runner import heartbeat
    for step in range(1, 4):
        heartbeat(step=step)
    raise SystemExit(int(sys.argv[1]))
    """
)


def _beats(interval: str, code: int) -> tuple[int, bytes]:
    read, write = os.pipe()
    env = {**os.environ, HEARTBEAT_FD_ENV: str(write), HEARTBEAT_INTERVAL_ENV: interval}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(code)], env=env, pass_fds=(write,), timeout=60
    )
    os.close(write)
    with os.fdopen(read, "rb") as f:
        return done.returncode, f.read()


def test_every_step_is_written_without_a_rate_limit() -> None:
    code, data = _beats("0", 0)
    assert code == 0 and data == b"s1\ns2\ns3\n"


def test_the_step_held_back_by_the_rate_limit_goes_at_exit() -> None:
    code, data = _beats("60", 5)  # the first beat goes, the others wait for 60 s
    assert code == 5 and read_steps(data) == (3, b"")
    assert data == b"s1\ns3\n"
