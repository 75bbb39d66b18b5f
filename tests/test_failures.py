"""Diagnosing failures: error files (ours and torch's), tracebacks, classification."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from elastic_runner import failures
from elastic_runner.error_file import read_error_file, record
from elastic_runner.failures import (
    diagnose,
    exception_line,
    find_traceback,
    last_traceback,
    stderr_traceback,
    strip_rank_prefix,
)
from elastic_runner.spec import Failure, FailureKind, WorkerExit

TORCH_FORMAT = {
    "message": {
        "message": "RuntimeError: boom",
        "extraInfo": {
            "py_callstack": "Traceback...\nRuntimeError: boom\n",
            "timestamp": "1700000000",
        },
    }
}


def test_record_writes_torch_format_and_reraises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))

    @record
    def main(x: int) -> int:
        raise ValueError(f"bad {x}")

    with pytest.raises(ValueError, match="bad 3"):
        main(3)
    data = json.loads(path.read_text())
    assert data["message"]["message"] == "ValueError: bad 3"
    extra = data["message"]["extraInfo"]
    assert "raise ValueError" in extra["py_callstack"]
    assert int(extra["timestamp"]) == int(float(extra["timestamp_precise"]))
    found = read_error_file(path)
    assert found is not None
    message, tb, ts = found
    assert message == "ValueError: bad 3" and ts == float(extra["timestamp_precise"])
    assert tb == extra["py_callstack"]


def test_record_leaves_system_exit_and_success_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    assert record(lambda: 5)() == 5
    with pytest.raises(SystemExit):
        record(lambda: (_ for _ in ()).throw(SystemExit(2)))()
    assert not path.exists()


def test_torch_format_error_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "e.json").write_text(json.dumps(TORCH_FORMAT))
    assert read_error_file(tmp_path / "e.json") == (
        "RuntimeError: boom",
        "Traceback...\nRuntimeError: boom\n",
        1700000000.0,
    )
    (tmp_path / "bad.json").write_text("{not json")
    assert read_error_file(tmp_path / "bad.json") is None
    assert read_error_file(tmp_path / "missing.json") is None


def test_last_traceback_is_extracted_from_stderr(tmp_path: Path) -> None:
    (tmp_path / "err").write_text(
        "Traceback (most recent call last):\n  old\nOldError\nlog line\n"
        'Traceback (most recent call last):\n  File "t.py", line 1, in <module>\n'
        "    f()\nZeroDivisionError: division by zero\nafter\n"
    )
    assert last_traceback(tmp_path / "err") == (
        'Traceback (most recent call last):\n  File "t.py", line 1, in <module>\n'
        "    f()\nZeroDivisionError: division by zero"
    )
    (tmp_path / "none").write_text("all good\n")
    assert last_traceback(tmp_path / "none") is None


#: Rank 1's stderr.log of a real run (torch 2.13.0, CPU, gloo) of an unchanged script,
#: ``init_process_group("gloo")`` then ``raise ValueError("boom")``, under elastic-run:
#: torch's excepthook prefixed the traceback, and only it.
TORCH_STDERR = (
    "/work/main/.venv-torch/lib/python3.11/site-packages/torch/_subclasses/"
    "functional_tensor.py:368: UserWarning: Failed to initialize NumPy: No module named "
    "'numpy' (Triggered internally at /__w/pytorch/pytorch/torch/csrc/utils/"
    "tensor_numpy.cpp:84.)\n"
    '  cpu = _conversion_method_template(device=torch.device("cpu"))\n'
    "[rank1]: Traceback (most recent call last):\n"
    '[rank1]:   File "/tmp/tq/x.py", line 6, in <module>\n'
    '[rank1]:     raise ValueError("boom")\n'
    "[rank1]: ValueError: boom\n"
)

#: The same with a chained exception whose message has two lines (real output too): empty
#: lines stay unprefixed.
TORCH_CHAINED = (
    "[rank0]: Traceback (most recent call last):\n"
    '[rank0]:   File "/tmp/tq/chained.py", line 8, in load\n'
    "[rank0]:     return {}[batch]\n"
    "[rank0]:            ~~^^^^^^^\n"
    "[rank0]: KeyError: 3\n"
    "\n"
    "[rank0]: The above exception was the direct cause of the following exception:\n"
    "\n"
    "[rank0]: Traceback (most recent call last):\n"
    '[rank0]:   File "/tmp/tq/chained.py", line 13, in <module>\n'
    "[rank0]:     load(3)\n"
    '[rank0]:   File "/tmp/tq/chained.py", line 10, in load\n'
    '[rank0]:     raise RuntimeError(f"bad batch {batch}\\nsecond line") from exc\n'
    "[rank0]: RuntimeError: bad batch 3\n"
    "[rank0]: second line\n"
)


def test_a_traceback_torch_prefixed_is_read_whole(tmp_path: Path) -> None:
    (tmp_path / "err").write_text(TORCH_STDERR)
    assert last_traceback(tmp_path / "err") == (
        "Traceback (most recent call last):\n"
        '  File "/tmp/tq/x.py", line 6, in <module>\n'
        '    raise ValueError("boom")\n'
        "ValueError: boom"
    )
    failure = _diagnose(tmp_path, 1)
    assert failure.message == "ValueError: boom"  # no error file: the exception line
    assert failure.traceback_source == "stderr"
    assert failure.traceback == last_traceback(tmp_path / "err")


def test_the_last_of_chained_tracebacks_and_what_follows_it() -> None:
    found = find_traceback(TORCH_CHAINED + "[rank0]:[W1203 10:11:12 ProcessGroup.cpp:1] x\n")
    assert found is not None
    assert found.text.splitlines() == [
        "Traceback (most recent call last):",
        '  File "/tmp/tq/chained.py", line 13, in <module>',
        "    load(3)",
        '  File "/tmp/tq/chained.py", line 10, in load',
        '    raise RuntimeError(f"bad batch {batch}\\nsecond line") from exc',
        "RuntimeError: bad batch 3",
    ]
    assert found.exception == "RuntimeError: bad batch 3"
    # after it, as written: the message's second line, then c10's warning
    assert found.after == ["[rank0]: second line", "[rank0]:[W1203 10:11:12 ProcessGroup.cpp:1] x"]


def test_a_traceback_cut_short_has_no_exception_line(tmp_path: Path) -> None:
    (tmp_path / "err").write_text(TORCH_STDERR)
    cut = TORCH_STDERR.index("[rank1]: ValueError")
    found = stderr_traceback(tmp_path / "err", end=cut)
    assert found is not None and found.exception is None and found.after == []
    assert found.text.endswith('raise ValueError("boom")')
    # a traceback after an unfinished line (a progress bar) is found mid-line
    mid = find_traceback("50%|#####  [rank1]: Traceback (most recent call last):\n  f\nE: x\n")
    assert mid is not None and mid.text == "Traceback (most recent call last):\n  f\nE: x"


@pytest.mark.parametrize(
    ("line", "stripped"),
    [
        ("[rank3]: ValueError: boom", "ValueError: boom"),
        ('[rank12]:   File "x.py", line 1', '  File "x.py", line 1'),
        ("[rank0]: [rank0]: Traceback", "Traceback"),  # the hook installed twice
        ("[rank0]: ", ""),
        (
            "[rank0]:[W1203 ProcessGroup.cpp:1] Warning",
            "[rank0]:[W1203 ProcessGroup.cpp:1] Warning",
        ),
        ("[ranks 0-3]: x", "[ranks 0-3]: x"),
        ("[default0]: x", "[default0]: x"),
        ("[rank]: x", "[rank]: x"),
        ("[rank-1]: x", "[rank-1]: x"),
        ("[rank\u0661]: x", "[rank\u0661]: x"),  # an Arabic-Indic digit is no rank
        (" [rank0]: x", " [rank0]: x"),
        ("x [rank0]: y", "x [rank0]: y"),
        ("[RANK0]: x", "[RANK0]: x"),
        ("[rank0]:x", "[rank0]:x"),
    ],
)
def test_only_torchs_rank_prefix_is_stripped(line: str, stripped: str) -> None:
    assert strip_rank_prefix(line) == stripped


#: Any text, and text made of the prefix's own characters (far likelier to come close to
#: a prefix without being one).
LINES = st.one_of(st.text(), st.text(alphabet="[rank]: 0129\u0661\t\nx"))


@given(LINES)
def test_stripping_never_raises_and_is_idempotent(line: str) -> None:
    once = strip_rank_prefix(line)
    assert strip_rank_prefix(once) == once
    if not (line.startswith("[rank") and "]: " in line):
        assert once == line  # a line without the prefix is left as it is


@given(st.integers(min_value=0, max_value=10**6), LINES)
def test_stripping_removes_exactly_the_prefix(rank: int, line: str) -> None:
    assert strip_rank_prefix(f"[rank{rank}]: {strip_rank_prefix(line)}") == strip_rank_prefix(line)


@given(st.lists(st.sampled_from([*TORCH_CHAINED.splitlines(), "", "x", "  y", "[rank2]: "])))
def test_finding_a_traceback_never_raises(lines: list[str]) -> None:
    found = find_traceback("\n".join(lines))
    if found is not None:
        assert found.text.startswith("Traceback (most recent call last):")
        assert found.exception is None or found.text.endswith(found.exception)


def test_the_exception_line_prefers_the_traceback_to_the_message() -> None:
    exit_ = WorkerExit(0, 0, 1, 1, 1.0)
    # torch's @record message has no module; the traceback (as stderr shows it) does
    failure = Failure(
        exit_,
        FailureKind.EXIT_CODE,
        1.0,
        message="BadBatch: 3",
        traceback="Traceback (most recent call last):\n  f\ndata.errors.BadBatch: 3\n",
    )
    assert exception_line(failure) == "data.errors.BadBatch: 3"
    assert exception_line(Failure(exit_, FailureKind.EXIT_CODE, 1.0, message="E: x")) == "E: x"
    assert exception_line(Failure(exit_, FailureKind.SIGNAL, 1.0)) is None


def test_a_stopped_worker_is_diagnosed_from_what_it_wrote_before_the_stop(
    tmp_path: Path,
) -> None:
    before = TORCH_STDERR.replace("rank1", "rank2")
    after = (
        "[rank2]: Traceback (most recent call last):\n[rank2]:   h\n[rank2]: KeyboardInterrupt\n"
    )
    (tmp_path / "err").write_text(before + after)
    failure = diagnose(
        WorkerExit(2, 2, 12, -signal.SIGKILL, 100.5),
        error_file=None,
        stderr=tmp_path / "err",
        stopped_after=len(before.encode()),
    )
    assert failure.message == "ValueError: boom" and failure.traceback is not None
    assert failure.traceback.endswith("ValueError: boom")
    # the agent's own SIGKILL: no OOM guess
    assert failure.kind == FailureKind.SIGNAL
    assert failure.describe() == "killed by SIGKILL; stopped by the agent after it had failed"


def _diagnose(
    tmp_path: Path,
    code: int,
    max_rss: int = 0,
    kill_reason: tuple[FailureKind, str] | None = None,
    oom_kills_before: int | None = None,
) -> Failure:
    return diagnose(
        WorkerExit(0, 0, 1, code, 100.5, max_rss=max_rss),
        error_file=tmp_path / "e.json",
        stderr=tmp_path / "err",
        kill_reason=kill_reason,
        oom_kills_before=oom_kills_before,
    )


def test_classification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _diagnose(tmp_path, 3).kind == FailureKind.EXIT_CODE
    segv = _diagnose(tmp_path, -signal.SIGSEGV)
    assert segv.kind == FailureKind.SIGNAL and segv.describe() == "killed by SIGSEGV"
    monkeypatch.setattr(failures, "oom_kill_count", lambda: 7)
    self_kill = _diagnose(tmp_path, -signal.SIGKILL, oom_kills_before=7)
    assert self_kill.kind == FailureKind.SIGNAL and "suspect the OOM killer" in self_kill.detail
    oom = _diagnose(tmp_path, -signal.SIGKILL, oom_kills_before=6)
    assert oom.kind == FailureKind.OOM_KILL and "(probable OOM kill)" in oom.describe()
    assert _diagnose(tmp_path, 137, oom_kills_before=6).kind == FailureKind.OOM_KILL
    assert "peak RSS" not in oom.detail  # unknown: not said
    big = _diagnose(tmp_path, -signal.SIGKILL, max_rss=3 * 2**30, oom_kills_before=6)
    assert big.detail.endswith("(see dmesg); its peak RSS was 3.0 GiB")
    big = _diagnose(tmp_path, -signal.SIGKILL, max_rss=3 * 2**30, oom_kills_before=7)
    assert big.detail.endswith("suspect the OOM killer; its peak RSS was 3.0 GiB")
    limit = _diagnose(
        tmp_path, -signal.SIGKILL, kill_reason=(FailureKind.MEMORY_LIMIT, "RSS 3 GiB > 2 GiB")
    )
    assert limit.kind == FailureKind.MEMORY_LIMIT and "RSS 3 GiB" in limit.describe()


def test_precise_error_time_orders_failures(tmp_path: Path) -> None:
    data = json.loads(json.dumps(TORCH_FORMAT))
    data["message"]["extraInfo"]["timestamp_precise"] = "100.25"
    (tmp_path / "e.json").write_text(json.dumps(data))
    assert _diagnose(tmp_path, 1).timestamp == 100.25
    # torch's whole seconds never move a failure earlier than the agent saw it exit
    (tmp_path / "e.json").write_text(json.dumps(TORCH_FORMAT))
    assert _diagnose(tmp_path, 1).timestamp == 100.5


def test_oom_kill_count_reads_vmstat() -> None:
    count = failures.oom_kill_count()
    assert count is None or count >= 0
    assert os.path.exists("/proc/vmstat")


def test_worker_side_import_is_the_decorator_and_light() -> None:
    code = (
        "import sys\n"
        "from elastic_runner import record\n"
        "assert callable(record) and record.__name__ == 'record', record\n"
        "heavy = {'pluggy', 'hydra', 'omegaconf', 'psutil'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
