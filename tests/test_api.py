""":func:`elastic_runner.launch` on the local rendezvous: what a function entrypoint may
be (a lambda, a closure, a function of ``__main__``) and what comes back, launching from a
thread and twice, what cannot be sent either way, configuration errors, the environment,
and what the run directory holds. Every launch is checked to leave the calling process
as it found it."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

import elastic_runner
from elastic_runner import ChildFailedError, LaunchError, launch
from elastic_runner.spec import RunResult, WorkerState
from elastic_runner.testing.caller import CallerState
from tests.conftest import assert_nothing_survives, by_value


class Checked:
    """Runs :func:`launch` and remembers the run ids; the ``checked`` fixture then proves
    that the caller is as it was and that no process of those runs is alive."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run_ids: set[str] = set()

    def __call__(self, entrypoint: Any, *args: Any, **kwargs: Any) -> RunResult:
        kwargs.setdefault("run_dir", self.run_dir)
        try:
            result = launch(entrypoint, *args, **kwargs)
        except ChildFailedError as exc:
            self.run_ids.add(exc.result.run_id)
            raise
        self.run_ids.add(result.run_id)
        return result


@pytest.fixture
def checked(tmp_path: Path) -> Iterator[Checked]:
    before = CallerState.now()
    runner = Checked(tmp_path / "run")
    yield runner
    # pytest names the phase it is in (setup, call, teardown) in the environment, and
    # pytest-timeout's SIGALRM handler (timeout_method=signal) may come and go with phases
    phase = {"PYTEST_CURRENT_TEST": os.environ["PYTEST_CURRENT_TEST"]}
    alarm = {int(signal.SIGALRM): signal.getsignal(signal.SIGALRM)}
    CallerState.now().assert_same_as(
        replace(
            before,
            environ={**before.environ, **phase},
            handlers={**before.handlers, **alarm},
        )
    )
    assert_nothing_survives(runner.run_ids, within=10)


@by_value
def _rank() -> int:
    return int(os.environ["RANK"])


@by_value
def echo(*args: Any, **kwargs: Any) -> tuple[int, tuple[Any, ...], dict[str, Any]]:
    return int(os.environ["RANK"]), args, kwargs


@by_value
def returns_then_fails_once() -> int:
    """Rank 0 returns at once; rank 1 fails on the first attempt after rank 0 returned."""
    rank = int(os.environ["RANK"])
    if rank == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        mine = Path(os.environ["TORCHELASTIC_ERROR_FILE"])
        while not (mine.parent.parent / "0" / "return.pkl").exists():
            time.sleep(0.01)
        sys.exit(3)
    return rank


# What a function entrypoint may be


def test_lambda(checked: Checked) -> None:
    result = checked(lambda: int(os.environ["RANK"]) * 10, (), ["job.nproc_per_node=2"])
    assert result.return_values == {0: 0, 1: 10}
    assert result.state == WorkerState.SUCCEEDED


def test_closure_capturing_a_local_variable(checked: Checked) -> None:
    offset = {"base": 100}

    def shifted(step: int) -> int:
        return offset["base"] + step * int(os.environ["RANK"])

    result = checked(shifted, (7,), ["job.nproc_per_node=2"])
    assert result.return_values == {0: 100, 1: 107}


MAIN = """\
import os, sys
import elastic_runner

def work(prefix):
    return f"{prefix}{os.environ['RANK']}/{os.environ['WORLD_SIZE']}"

result = elastic_runner.launch(work, ("rank",), ["job.nproc_per_node=2"], run_dir=sys.argv[1])
print("RUN_ID", result.run_id)
print("RETURNED", sorted(result.return_values.items()))
"""


def test_function_defined_in_main(checked: Checked, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", MAIN, str(tmp_path / "main-run")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["RETURNED"] == "[(0, 'rank0/2'), (1, 'rank1/2')]", done.stdout
    assert_nothing_survives({lines["RUN_ID"]})


def test_args_and_kwargs(checked: Checked) -> None:
    result = checked(echo, (1, [2]), ["job.nproc_per_node=2"], kwargs={"k": {"v": None}})
    assert result.return_values == {r: (r, (1, [2]), {"k": {"v": None}}) for r in (0, 1)}


def test_launch_from_a_thread(checked: Checked) -> None:
    """A launch from a thread other than the main one sets no signal handler (it cannot)
    and works all the same; the ``checked`` fixture checks the handlers after."""
    results: list[RunResult] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(checked(echo, ("t",), ["job.nproc_per_node=2"]))
        except BaseException as exc:
            errors.append(exc)

    handlers = CallerState.now().handlers
    thread = threading.Thread(target=run, name="launcher")
    thread.start()
    thread.join(timeout=120)
    assert CallerState.now().handlers == handlers
    assert not thread.is_alive()
    assert not errors, errors
    assert results[0].return_values == {0: (0, ("t",), {}), 1: (1, ("t",), {})}


def test_launch_twice_in_one_process(checked: Checked, tmp_path: Path) -> None:
    first = checked(lambda: ("first", _rank()), (), ["job.nproc_per_node=2"])
    second = checked(
        lambda: ("second", _rank()), (), ["job.nproc_per_node=1"], run_dir=tmp_path / "run2"
    )
    assert first.return_values == {0: ("first", 0), 1: ("first", 1)}
    assert second.return_values == {0: ("second", 0)}
    assert first.run_id != second.run_id


# What cannot be sent


def test_unpicklable_function(checked: Checked) -> None:
    lock = threading.Lock()
    with pytest.raises(LaunchError) as info:
        checked(lambda: lock.locked(), (), ["job.nproc_per_node=2"])
    message = str(info.value)
    assert "test_unpicklable_function.<locals>.<lambda>" in message
    assert "cannot pickle" in message and "\n" not in message
    assert not checked.run_dir.exists()  # no job started there


def test_unpicklable_argument(checked: Checked) -> None:
    with pytest.raises(LaunchError) as info:
        checked(echo, (threading.Lock(),), ["job.nproc_per_node=2"])
    assert f"{__name__}.echo" in str(info.value)
    assert not checked.run_dir.exists()


def test_return_value_that_cannot_be_sent_back(checked: Checked) -> None:
    with pytest.raises(ChildFailedError) as info:
        checked(lambda: (i for i in range(3)), (), ["job.nproc_per_node=2"])
    message = str(info.value)
    assert "cannot be sent back to the caller" in message, message
    assert "generator" in message and "\n" not in message
    assert info.value.get_first_failure()[1].exitcode == 1


# Configuration errors: one line, nothing started


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["job.nproc_per_node=zero"], "job.nproc_per_node=zero"),
        (["job.nproc_per_node=0"], "job.nproc_per_node=0"),
        (["nosuchkey=1"], "nosuchkey"),
        (["rdzv=nosuch"], "rdzv=nosuch"),
        (["max_restarts=-1"], "max_restarts"),
        (["job.args=[unclosed"], "job.args"),
    ],
)
def test_bad_overrides(checked: Checked, overrides: list[str], named: str) -> None:
    with pytest.raises(LaunchError) as info:
        checked(echo, (), overrides)
    message = str(info.value)
    assert named in message and "\n" not in message, message
    assert not checked.run_dir.exists()


def test_overrides_given_as_one_string(checked: Checked) -> None:
    with pytest.raises(LaunchError, match=r"^overrides: a list of strings"):
        checked(echo, (), "job.nproc_per_node=2")


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda run_dir: launch(cast(Any, 3), run_dir=run_dir), "entrypoint"),
        (lambda run_dir: launch(cast(Any, b"train.py"), run_dir=run_dir), "entrypoint"),
        (lambda run_dir: launch("train.py", [object()], run_dir=run_dir), "args"),
        (lambda run_dir: launch("train.py", [True], run_dir=run_dir), "args"),
        (lambda run_dir: launch("train.py", "--lr", run_dir=run_dir), "args"),
        (lambda run_dir: launch("train.py", kwargs={"a": 1}, run_dir=run_dir), "kwargs"),
        (lambda run_dir: launch(module="m", kwargs={"a": 1}, run_dir=run_dir), "kwargs"),
        (lambda run_dir: launch("train.py", module="train", run_dir=run_dir), "module"),
        (lambda run_dir: launch(echo, env=cast(Any, {"A": 1}), run_dir=run_dir), "env['A']"),
        (lambda run_dir: launch(echo, config_dir="/no/such/dir", run_dir=run_dir), "config_dir"),
        (lambda run_dir: launch(run_dir=run_dir), "job.entrypoint"),
    ],
)
def test_bad_arguments(checked: Checked, call: Callable[[Path], RunResult], named: str) -> None:
    with pytest.raises(LaunchError) as info:
        call(checked.run_dir)
    message = str(info.value)
    assert named in message and "\n" not in message, message
    assert not checked.run_dir.exists()


# The workers' environment


def test_env_adds_and_removes_variables(checked: Checked, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ER_API_REMOVED", "caller's")
    monkeypatch.setenv("ER_API_KEPT", "caller's")
    monkeypatch.delenv("ER_API_ADDED", raising=False)

    def seen() -> tuple[str | None, ...]:
        names = ("ER_API_REMOVED", "ER_API_KEPT", "ER_API_ADDED")
        return tuple(os.environ.get(name) for name in names)

    result = checked(
        seen, (), ["job.nproc_per_node=2"], env={"ER_API_REMOVED": None, "ER_API_ADDED": "1"}
    )
    assert result.return_values == {r: (None, "caller's", "1") for r in (0, 1)}
    # the caller's own environment is untouched (the fixture compares all of it)
    assert os.environ["ER_API_REMOVED"] == "caller's"
    assert "ER_API_ADDED" not in os.environ


# What the run directory holds


def test_result_json_and_log(checked: Checked) -> None:
    result = checked(echo, (), ["job.nproc_per_node=2"])
    assert result.run_dir == checked.run_dir
    written = json.loads((checked.run_dir / "result.json").read_text())
    assert written["exit_code"] == 0
    assert written["state"] == "SUCCEEDED"
    assert written["run_id"] == result.run_id
    assert written["overrides"] == ["job.nproc_per_node=2"]
    log = (checked.run_dir / "elastic-run.log").read_text()
    assert f"run {result.run_id}" in log
    assert not (checked.run_dir / "launch-call.pkl").exists()  # the payload is gone
    assert not list(checked.run_dir.rglob("return.pkl"))  # so are the return values


def test_result_json_of_a_failed_run(checked: Checked) -> None:
    def fail() -> None:
        raise KeyError("missing")

    result = checked(fail, (), ["job.nproc_per_node=1"], raise_on_failure=False)
    assert result.is_failed() and result.exit_code == 1
    assert result.root_cause is not None and "KeyError" in (result.root_cause.message or "")
    written = json.loads((checked.run_dir / "result.json").read_text())
    assert (written["exit_code"], written["state"]) == (1, "FAILED")
    assert "elastic_runner" in (checked.run_dir / "elastic-run.log").read_text()


# Presets from config_dir


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    conf = tmp_path / "conf"
    (conf / "job").mkdir(parents=True)
    (conf / "job" / "mine.yaml").write_text(
        textwrap.dedent(
            """\
            module: elastic_runner.demo.hello
            nproc_per_node: 3
            env:
              FROM_PRESET: mine
            """
        )
    )
    return conf


def test_custom_preset_with_a_function(checked: Checked, config_dir: Path) -> None:
    result = checked(
        lambda: (_rank(), os.environ["FROM_PRESET"]), (), ["+job=mine"], config_dir=config_dir
    )
    assert result.return_values == {r: (r, "mine") for r in range(3)}


def test_custom_preset_alone(checked: Checked, config_dir: Path) -> None:
    result = checked(None, (), ["+job=mine", "job.nproc_per_node=2"], config_dir=config_dir)
    assert result.return_values == {0: None, 1: None}
    assert result.state == WorkerState.SUCCEEDED


def test_package_exports() -> None:
    assert elastic_runner.launch is launch
    assert elastic_runner.ChildFailedError is ChildFailedError
    assert issubclass(elastic_runner.LaunchError, ValueError)


MP_MAIN = """
import multiprocessing, sys, elastic_runner

def work():  # of the main script: __mp_main__ in the Pool's process
    return 7

def node(run_dir):
    return elastic_runner.launch(work, overrides=["logs.tee=false"], run_dir=run_dir)

def fails(run_dir):
    return elastic_runner.launch(lambda: 1 / 0, overrides=["logs.tee=false"], run_dir=run_dir)

if __name__ == "__main__":
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        print("RETURNED", pool.apply(node, (sys.argv[1] + "/a",)).return_values)
        try:
            pool.apply(fails, (sys.argv[1] + "/b",))
        except elastic_runner.ChildFailedError as exc:  # crossed the pipe whole
            print("RAISED", exc, exc.result.exit_code)
"""


def test_functions_of_the_main_script_from_a_multiprocessing_child(tmp_path: Path) -> None:
    script = tmp_path / "main.py"
    script.write_text(MP_MAIN)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "RETURNED {0: 7}" in done.stdout, done.stderr
    assert "RAISED rank 0: exit code 1: ZeroDivisionError: division by zero 1" in done.stdout


def test_child_failed_error_pickles(checked: Checked) -> None:
    with pytest.raises(ChildFailedError) as info:
        checked(lambda: 1 / 0, (), ["job.nproc_per_node=1"])
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value) and copy.result.exit_code == 1


def test_hydra_settings_are_refused(checked: Checked) -> None:
    with pytest.raises(LaunchError, match=r"^hydra.run.dir=x: .*run_dir="):
        checked(echo, (), ["hydra.run.dir=x"])


def test_return_values_of_earlier_attempts_are_removed(checked: Checked) -> None:
    result = checked(returns_then_fails_once, (), ["job.nproc_per_node=2", "max_restarts=1"])
    assert result.restart_count == 1 and result.return_values == {0: 0, 1: 1}
    assert not list(checked.run_dir.rglob("return.pkl"))


def test_a_group_option_named_null_is_taken_as_on_the_command_line(checked: Checked) -> None:
    """``events=null`` selects the option ``null`` (no event log), as ``elastic-run``'s
    own front door reads it, not Hydra's None."""
    result = checked(echo, (), ["job.nproc_per_node=1", "events=null"])
    assert result.return_values == {0: (0, (), {})}
    assert not (checked.run_dir / "events.jsonl").exists()
