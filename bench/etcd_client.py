"""What one etcd store request costs the client: CPU and wall milliseconds per call of
:class:`~elastic_runner.rendezvous.etcd_store.EtcdStore` (get, set, set with a TTL, which
is two requests, scan, a lease keep-alive), medians of ``--runs`` runs of ``--calls``
calls each, against a real etcd on a temporary data dir, through etcd's JSON gateway
and over gRPC (``--api``; gRPC where grpcio is installed). Beside it, where
``requests`` is installed, a bare ``requests`` session posting the same range request
(what each of the store's requests cost through etcd3gw before), and etcd's own CPU per
request. ``--threads T`` makes each call from T threads at once (T stores, as T
participants of a benchmark process: the wall time is then per call of all threads)::

    .venv/bin/python bench/etcd_client.py --runs 5 --calls 500 [--threads 16]
"""

from __future__ import annotations

import argparse
import base64
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from elastic_runner.rendezvous.etcd_store import EtcdStore, grpc_available
from elastic_runner.testing.etcd import EtcdServer, etcd_binary


def _per_call(
    fns: list[Callable[[], object]], calls: int, server: psutil.Process
) -> tuple[float, ...]:
    """CPU, wall and etcd's CPU ms per call, ``calls`` calls of each of ``fns`` (one
    thread each when there are several)."""

    def loop(fn: Callable[[], object], n: int) -> None:
        for _ in range(n):
            fn()

    def all_at_once(n: int) -> None:
        threads = [threading.Thread(target=loop, args=(fn, n)) for fn in fns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    all_at_once(20)
    cpu, wall, etcd = time.process_time(), time.perf_counter(), sum(server.cpu_times()[:2])
    all_at_once(calls)
    total = calls * len(fns)
    return (
        1e3 * (time.process_time() - cpu) / total,
        1e3 * (time.perf_counter() - wall) / total,
        1e3 * (sum(server.cpu_times()[:2]) - etcd) / total,
    )


def _cases(stores: list[EtcdStore]) -> dict[str, list[Callable[[], object]]]:
    for store in stores:
        store.set("k", "v")
        store.set("t", "v", ttl=30)
    return {
        "get": [lambda s=s: s.get("k") for s in stores],
        "set": [lambda s=s: s.set("k", "v") for s in stores],
        "set with a TTL (2 requests)": [lambda s=s: s.set("t", "v", ttl=30) for s in stores],
        "scan": [lambda s=s: s.scan("k") for s in stores],
        "refresh (keep-alive)": [lambda s=s: s.refresh("t", 30) for s in stores],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument(
        "--api", choices=("both", "http", "grpc"), default="both", help="how to reach etcd"
    )
    parser.add_argument("--threads", type=int, default=1, help="callers at once (1)")
    args = parser.parse_args()
    if args.threads < 1 or args.calls < 1 or args.runs < 1:
        parser.error("--threads, --calls and --runs must be at least 1")
    apis = ["http", "grpc"] if args.api == "both" else [args.api]
    if "grpc" in apis and not grpc_available():
        if args.api == "grpc":
            raise SystemExit("--api grpc needs grpcio (pip install 'elastic-runner[etcd]')")
        apis.remove("grpc")
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
            cases: dict[str, list[Callable[[], object]]] = {}
            stores: list[EtcdStore] = []
            for api in apis:
                made = [
                    EtcdStore([(host, int(port))], namespace=f"/bench{i}/", api=api)
                    for i in range(args.threads)
                ]
                stores += made
                way = "gateway" if api == "http" else "gRPC"
                for name, fns in _cases(made).items():
                    cases[f"{name}, {way}"] = fns
            try:
                import requests

                session = requests.Session()
                url = f"http://{server.endpoint}/v3/kv/range"
                body = {"key": base64.b64encode(b"/bench0/k").decode()}
                cases["a requests session's range (before)"] = [
                    lambda: session.post(url, json=body, timeout=10).json()
                ]
            except ImportError:
                pass
            print(f"{'call':<44} {'client CPU ms':>13} {'wall ms':>9} {'etcd CPU ms':>12}")
            for name, fns in cases.items():
                runs = [_per_call(fns, args.calls, etcd) for _ in range(args.runs)]
                cpu, wall, server_cpu = (statistics.median(col) for col in zip(*runs, strict=True))
                print(f"{name:<44} {cpu:>13.3f} {wall:>9.3f} {server_cpu:>12.3f}")
            for store in stores:
                store.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
