"""Property-based tests of the TCP store's wire protocol against a real server.

Random frames before and after ``hello`` (random bytes, random JSON of random shapes,
requests with random arguments: NaN, infinities, huge integers, deep nesting, wrong
types, sequences of them on one connection). After every example the server answers a
well-formed request on a fresh connection, its thread is alive, no connection is left
behind; after all the examples of a test, nothing was logged with a traceback and few
lines at all, the RSS stayed bounded and the server's thread is idle. The examples are
derandomized (the same on every run, no example database), so CI cannot flake.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import struct
import time
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_runner.rendezvous.tcp_server import StoreLimits, TCPStoreServer
from elastic_runner.rendezvous.tcp_wire import MAX_HELLO, MAX_REQUEST

TOKEN = "fuzz-token"
#: Derandomized, no example database, no deadline: the same examples on every run.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    # the fixture ``watched`` is per test on purpose (its checks run after all examples)
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
OPS = [
    "hello",
    "set",
    "refresh",
    "get",
    "add",
    "compare_set",
    "delete",
    "delete_prefix",
    "multi_get",
    "multi_set",
    "scan",
    "wait_for_change",
    "wait",
]
ARGS = ["key", "value", "ttl", "amount", "expected", "desired", "prefix", "keys", "items"]
ARGS += ["version", "timeout"]

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, 10**300, -1, 0, 1e-300, 2**63]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=30))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def nested(draw: st.DrawFn) -> str:
    """JSON nested deeper than the parser's recursion limit, or just under it."""
    depth = draw(st.sampled_from([10, 900, 1100, 5000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return opener * depth + "1" + closer * depth


#: An argument's value as JSON text: any shape, or nested too deep for the parser.
argument_values = st.one_of(json_values.map(json.dumps), nested())


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A request's body: a known or unknown op, with arguments of any name and value."""
    op = draw(st.one_of(st.sampled_from(OPS), st.text(max_size=12), json_values))
    names = st.one_of(st.sampled_from(ARGS), st.text(max_size=8))
    if draw(st.integers(0, 9)):
        items = draw(st.dictionaries(names, argument_values, max_size=5))
        args = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in items.items()) + "}"
    else:  # not an object at all
        args = json.dumps(draw(json_values))
    fields = [f'"op":{json.dumps(op)}', f'"args":{args}']
    if draw(st.booleans()):
        fields.append(f'"id":{json.dumps(draw(json_values))}')
    if op == "hello":
        fields.append(f'"token":{json.dumps(draw(st.one_of(st.just(TOKEN), json_values)))}')
    return ("{" + ",".join(fields) + "}").encode()


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


frames = st.one_of(
    requests().map(_frame),
    json_values.map(lambda v: _frame(json.dumps(v).encode())),
    st.binary(max_size=64).map(_frame),  # not JSON
    st.binary(max_size=64),  # not even a frame
    st.tuples(  # a header that promises more (much more) than what follows
        st.sampled_from([MAX_HELLO, MAX_HELLO + 1, MAX_REQUEST, MAX_REQUEST + 1, 2**32 - 1]),
        st.binary(max_size=64),
    ).map(lambda t: struct.pack(">I", t[0]) + t[1]),
)


@pytest.fixture(scope="module")
def server() -> Iterator[TCPStoreServer]:
    # short waits: a fuzzed request that waits validly must not hold the run up
    s = TCPStoreServer("127.0.0.1", 0, token=TOKEN, limits=StoreLimits(hello_timeout=2.0))
    yield s
    s.close()


def _exchange(port: int, payload: bytes, hello: bool) -> None:
    """Send ``payload`` (after a hello, if ``hello``), then the end of stream; read what
    comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if hello:
            sock.sendall(_frame(json.dumps({"id": 0, "op": "hello", "token": TOKEN}).encode()))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        except OSError:  # reset, broken pipe, not connected: closed on us, fine
            pass


def _answers(server: TCPStoreServer) -> None:
    """The server answers a well-formed request on a fresh connection, its thread is
    alive, and nothing of the example is left open."""
    assert server.is_alive()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        probes: list[dict[str, object]] = [
            {"op": "hello", "token": TOKEN},
            {"op": "set", "args": {"key": "probe", "value": "ok"}},
            {"op": "get", "args": {"key": "probe"}},
            {"op": "scan", "args": {"prefix": ""}},  # every key there is: all still strings
            {"op": "wait", "args": {"keys": ["probe"], "timeout": 0}},
        ]
        answers = []
        for rid, message in enumerate(probes):
            sock.sendall(_frame(json.dumps({"id": rid, **message}).encode()))
            header = sock.recv(4, socket.MSG_WAITALL)
            body = sock.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL)
            answers.append(json.loads(body))
            assert answers[-1]["ok"] and answers[-1]["id"] == rid, answers[-1]
        assert answers[2]["result"] == "ok"
        assert all(isinstance(k, str) for k in answers[3]["result"][0])
    deadline = time.monotonic() + 5
    while server.connections > 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.connections == 0


class _Watch(logging.Handler):
    """What one fuzzing test costs the server: its log records, this process's RSS (the
    server's thread serves in it) at its highest after each example."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = self.start

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)


def _thread_cpu(server: TCPStoreServer) -> float:
    """CPU seconds the server's thread has used."""
    native = server._thread.native_id
    for thread in psutil.Process().threads():
        if thread.id == native:
            return float(thread.user_time + thread.system_time)
    return 0.0


@pytest.fixture
def watched(server: TCPStoreServer) -> Iterator[_Watch]:
    """After a test's examples: no traceback was logged and few lines at all (each kind
    of refusal is rate-limited), the RSS stayed bounded, and the server's thread is idle
    (nothing left spinning, as a NaN timer would)."""
    watch = _Watch()
    loggers = [
        logging.getLogger("elastic_runner.rendezvous.tcp_server"),
        logging.getLogger("asyncio"),
    ]
    for logger in loggers:
        logger.addHandler(watch)
    try:
        yield watch
    finally:
        for logger in loggers:
            logger.removeHandler(watch)
    tracebacks = [r.getMessage() for r in watch.records if r.exc_info and r.levelno > logging.DEBUG]
    assert not tracebacks, tracebacks[:3]
    lines = [r.getMessage() for r in watch.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 12, lines
    grown = (watch.peak - watch.start) / 2**20
    assert grown < 64, f"RSS grew by {grown:.0f} MiB over the fuzzing run"
    cpu = _thread_cpu(server)
    time.sleep(0.3)
    assert _thread_cpu(server) - cpu < 0.06, "the server's thread is busy with nothing to do"


@FUZZ
@given(payload=frames)
def test_any_frame_before_hello(server: TCPStoreServer, watched: _Watch, payload: bytes) -> None:
    _exchange(server.port, payload, hello=False)
    _answers(server)
    watched.sample()


@FUZZ
@given(payload=frames)
def test_any_frame_after_hello(server: TCPStoreServer, watched: _Watch, payload: bytes) -> None:
    _exchange(server.port, payload, hello=True)
    _answers(server)
    watched.sample()


@FUZZ
@given(sequence=st.lists(requests(), min_size=1, max_size=8))
def test_any_sequence_of_requests(
    server: TCPStoreServer, watched: _Watch, sequence: list[bytes]
) -> None:
    _exchange(server.port, b"".join(_frame(body) for body in sequence), hello=True)
    _answers(server)
    watched.sample()
