"""``bench/scale.py --quick`` runs end to end (tcp, N = 32 and 64; about 15 s): it
completes, prints its table and targets, and leaves no process or temp dir behind; with
``--profile`` on etcd it saves etcd's CPU profile and says where its time went."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "scale.py"


def _processes_mentioning(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _run_bench(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a bench script to its end, every temp dir of it (its processes name it) under
    ``tmp_path``; it must succeed."""
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=80,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdin=subprocess.DEVNULL,
        cwd=BENCH.parent.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc


def _needs_etcd() -> None:
    from elastic_runner.testing.etcd import etcd_binary

    if etcd_binary() is None:
        pytest.fail("no etcd binary: apt-get install etcd-server")


@pytest.mark.timeout(90)
def test_quick_mode_completes_prints_the_table_and_cleans_up(tmp_path: Path) -> None:
    proc = _run_bench([sys.executable, str(BENCH), "--quick"], tmp_path)
    out = proc.stdout
    assert "== tcp ==" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["32"], ["64"])]
    assert [r[0] for r in rows] == ["32", "64"], out
    assert all(r[-1] == "ok" for r in rows), out
    assert "log-log slope of bytes/round" in out
    assert "targets:" in out
    assert not _processes_mentioning(str(tmp_path))
    assert not list(tmp_path.glob("bench-scale-*"))


@pytest.mark.timeout(90)
def test_an_etcd_profile_says_where_etcds_time_went(tmp_path: Path) -> None:
    _needs_etcd()
    profile = tmp_path / "etcd.pprof"
    argv = [sys.executable, str(BENCH), "--backends", "etcd", "--sizes", "16", "--periods", "1"]
    argv += ["--heartbeat-interval", "0.5", "--budget", "30"]
    argv += ["--profile", str(profile), "--profile-seconds", "2"]
    proc = _run_bench(argv, tmp_path)
    assert "etcd N=16, from the round's start" in proc.stderr, proc.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("pprof_top", BENCH.parent / "pprof_top.py")
    assert spec is not None and spec.loader is not None
    pprof_top: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pprof_top)
    # the saved profile is etcd's own: its samples' stacks name etcd's and Go's functions
    read = pprof_top.Profile(profile.with_name("etcd.pprof.16"))
    assert read.total_ns > 0 and read.samples
    assert any(name.startswith("go.etcd.io/") for stack, _ in read.samples for name in stack)
    text = pprof_top.report(read)
    parts = text.split("functions by cumulative CPU")[0].splitlines()[1:]
    shares = [float(line.split("%")[0]) for line in parts]
    assert abs(sum(shares) - 100) < 1, shares
    assert not _processes_mentioning(str(tmp_path))


@pytest.mark.timeout(90)
def test_what_an_etcd_request_costs_both_ways(tmp_path: Path) -> None:
    """``bench/etcd_client.py`` prints each store call's cost through the gateway and
    over gRPC, from several threads at once, and leaves no etcd behind."""
    _needs_etcd()
    argv = [sys.executable, str(BENCH.parent / "etcd_client.py"), "--runs", "1"]
    argv += ["--calls", "5", "--threads", "3"]
    proc = _run_bench(argv, tmp_path)
    costs = {}
    for line in proc.stdout.splitlines():
        name, _, figures = line.rpartition(", ")
        if figures.split()[:1] in (["gateway"], ["gRPC"]):
            way, *numbers = figures.split()
            costs[(name, way)] = [float(n) for n in numbers]
    calls = ["get", "set", "set with a TTL (2 requests)", "scan", "refresh (keep-alive)"]
    assert set(costs) == {(c, w) for c in calls for w in ("gateway", "gRPC")}, proc.stdout
    # client CPU, wall and etcd's CPU, each a real figure
    assert all(len(v) == 3 and v[1] > 0 for v in costs.values()), proc.stdout
    assert not _processes_mentioning(str(tmp_path))
