"""``bench/scale.py --quick`` runs end to end (tcp, N = 32 and 64; about 15 s): it
completes, prints its table and targets, and leaves no process or temp dir behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.timeout(90)
def test_quick_mode_completes_prints_the_table_and_cleans_up(tmp_path: Path) -> None:
    # every temp dir of the bench (its processes name it) lands under tmp_path
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=80,
        env=env,
        stdin=subprocess.DEVNULL,
        cwd=BENCH.parent.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "== tcp ==" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["32"], ["64"])]
    assert [r[0] for r in rows] == ["32", "64"], out
    assert all(r[-1] == "ok" for r in rows), out
    assert "log-log slope of bytes/round" in out
    assert "targets:" in out
    assert not _processes_mentioning(str(tmp_path))
    assert not list(tmp_path.glob("bench-scale-*"))
