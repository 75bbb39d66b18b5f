"""The store process of ``bench/scale.py`` for ``tcp`` and ``torch`` (not a benchmark).

``_scale_store.py tcp FILE|- MARKER`` (this project's virtualenv): elastic-run's
``TCPStoreServer`` on 127.0.0.1, a free port, connection caps raised to what the open-file
limit allows (every participant holds three connections: its main thread, its heartbeat
and its watcher). ``_scale_store.py torch - MARKER`` (the ``--torch-python``): torch's libuv
``TCPStore`` (``is_master=True``) on 127.0.0.1, a free port.

First line on stdout: ``{"port": P}``. Then, one command a line on stdin, one JSON line
back: ``stats`` (``tcp`` only: the server's request and byte counters, connections
open), ``profile`` (``tcp`` with a FILE: write the server thread's cProfile, top functions
by own time, to FILE). End of stdin ends the process.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve_tcp(profile: str | None) -> None:
    import cProfile
    import io
    import pstats
    import threading

    from elastic_runner.rendezvous.tcp_server import StoreLimits, TCPStoreServer

    nofile = _raise_nofile()
    limits = StoreLimits(max_connections=max(64, nofile - 64))
    server = TCPStoreServer("127.0.0.1", 0, limits=limits)
    prof: cProfile.Profile | None = None
    if profile:
        prof = cProfile.Profile()
        started = threading.Event()

        def enable() -> None:
            assert prof is not None
            prof.enable()  # in the server's thread: profiles that thread
            started.set()

        server._loop.call_soon_threadsafe(enable)
        started.wait(5)
    _reply({"port": server.port, "max_connections": limits.max_connections})
    # How late the server's loop runs a callback (sampled every 0.2 s from this thread):
    # a request waits about that long before it is read. Worst since the last stats.
    lag = [0.0]

    def sample() -> None:
        while True:
            ran = threading.Event()
            asked = time.monotonic()
            server._loop.call_soon_threadsafe(ran.set)
            if not ran.wait(60):
                lag[0] = max(lag[0], 60.0)
                continue
            lag[0] = max(lag[0], time.monotonic() - asked)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            for _ in range(100):  # the server's thread may grow the counters meanwhile
                try:
                    by_op = dict(server.requests)
                    refused = dict(server.refused)
                    break
                except RuntimeError:
                    continue
            else:
                by_op, refused = {}, {}
            _reply(
                {
                    "requests": sum(by_op.values()),
                    "by_op": by_op,
                    "bytes_in": server.bytes_in,
                    "bytes_out": server.bytes_out,
                    "connections": server.connections,
                    "refused": refused,
                    "loop_lag_s": lag[0],
                }
            )
            lag[0] = 0.0
        elif cmd == "profile" and prof is not None and profile:
            done = threading.Event()
            text = io.StringIO()

            def dump(text: io.StringIO = text, done: threading.Event = done) -> None:
                assert prof is not None
                prof.disable()
                stats = pstats.Stats(prof, stream=text)
                stats.sort_stats("tottime").print_stats(30)
                prof.enable()
                done.set()

            server._loop.call_soon_threadsafe(dump)
            done.wait(30)
            with open(profile, "a") as f:
                f.write(text.getvalue())
            _reply({"ok": True})
        else:
            _reply({"error": f"unknown command {cmd!r}"})
    server.close()


def serve_torch() -> None:
    from datetime import timedelta

    from torch.distributed import TCPStore

    _raise_nofile()
    store = TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        use_libuv=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=3600),
    )
    _reply({"port": store.port})
    for line in sys.stdin:
        _reply({"error": f"unknown command {line.strip()!r}"})


def main() -> None:
    # argv: kind, profile file ("-": none), then the bench's temp dir (a marker only)
    kind = sys.argv[1]
    if kind == "tcp":
        profile = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
        serve_tcp(profile)
    elif kind == "torch":
        serve_torch()
    else:
        raise SystemExit(f"unknown store {kind!r}")


if __name__ == "__main__":
    main()
