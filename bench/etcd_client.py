"""What one etcd store request costs the client: CPU and wall milliseconds per call of
:class:`~elastic_runner.rendezvous.etcd_store.EtcdStore` (get, set, set with a TTL, which
is two requests, scan, a lease keep-alive), medians of ``--runs`` runs of ``--calls``
calls each, against a real etcd on a temporary data dir. Beside it, where ``requests``
is installed, a bare ``requests`` session posting the same range request (what each of
the store's requests cost through etcd3gw before), and etcd's own CPU per request::

    .venv/bin/python bench/etcd_client.py --runs 5 --calls 500
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.testing.etcd import EtcdServer, etcd_binary


def _per_call(fn: Callable[[], object], calls: int, server: psutil.Process) -> tuple[float, ...]:
    for _ in range(20):
        fn()
    cpu, wall, etcd = time.process_time(), time.perf_counter(), sum(server.cpu_times()[:2])
    for _ in range(calls):
        fn()
    return (
        1e3 * (time.process_time() - cpu) / calls,
        1e3 * (time.perf_counter() - wall) / calls,
        1e3 * (sum(server.cpu_times()[:2]) - etcd) / calls,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    binary = etcd_binary()
    if binary is None:
        raise SystemExit("no etcd binary (apt-get install etcd-server)")
    with tempfile.TemporaryDirectory() as tmp:
        server = EtcdServer(binary, Path(tmp) / "data")
        server.start()
        try:
            assert server.proc is not None
            etcd = psutil.Process(server.proc.pid)
            host, port = server.endpoint.rsplit(":", 1)
            store = EtcdStore([(host, int(port))], namespace="/bench/")
            store.set("k", "v")
            store.set("t", "v", ttl=30)
            cases: dict[str, Callable[[], object]] = {
                "get": lambda: store.get("k"),
                "set": lambda: store.set("k", "v"),
                "set with a TTL (2 requests)": lambda: store.set("t", "v", ttl=30),
                "scan": lambda: store.scan("k"),
                "refresh (keep-alive)": lambda: store.refresh("t", 30),
            }
            try:
                import requests

                session = requests.Session()
                url = f"http://{server.endpoint}/v3/kv/range"
                body = {"key": base64.b64encode(b"/bench/k").decode()}
                cases["a requests session's range (before)"] = lambda: session.post(
                    url, json=body, timeout=10
                ).json()
            except ImportError:
                pass
            print(f"{'call':<38} {'client CPU ms':>13} {'wall ms':>9} {'etcd CPU ms':>12}")
            for name, fn in cases.items():
                runs = [_per_call(fn, args.calls, etcd) for _ in range(args.runs)]
                cpu, wall, server_cpu = (statistics.median(col) for col in zip(*runs, strict=True))
                print(f"{name:<38} {cpu:>13.3f} {wall:>9.3f} {server_cpu:>12.3f}")
            store.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
