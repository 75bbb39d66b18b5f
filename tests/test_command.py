"""resolve_command: ``job.entrypoint`` / ``job.module`` / ``job.python`` to a worker's argv."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from elastic_runner.errors import ConfigError
from elastic_runner.workers.command import resolve_command


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current directory with ``train.py``, ``train`` (no suffix, not executable),
    ``tool.py`` (executable) and ``bin/mytool`` (executable, ``bin`` on PATH only in the
    env the tests pass)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("print('hi')\n")
    (tmp_path / "train").write_text("print('hi')\n")
    (tmp_path / "tool.py").write_text("#!/bin/sh\necho tool\n")
    (tmp_path / "tool.py").chmod(0o755)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "mytool").write_text("#!/bin/sh\necho mytool\n")
    (tmp_path / "bin" / "mytool").chmod(0o755)
    return tmp_path


def _env(here: Path) -> dict[str, str]:
    return {"PATH": f"{here / 'bin'}:/usr/bin:/bin"}


def test_by_name_a_py_file_runs_with_python_anything_else_from_path(here: Path) -> None:
    env = _env(here)  # python=None: the default, by the entrypoint's name
    assert resolve_command("train.py", None, ["-x"], env=env) == (
        sys.executable,
        "-u",
        str(here / "train.py"),
        "-x",
    )
    assert resolve_command("mytool", None, ["a"], python=None, env=env) == (
        str(here / "bin" / "mytool"),
        "a",
    )
    with pytest.raises(ConfigError, match=r"^job.entrypoint=train: not a \.py file and no"):
        resolve_command("train", None, [], env=env)


def test_python_true_runs_any_file_with_python(here: Path) -> None:
    env = {**_env(here), "PYTHON_EXEC": "/opt/py/bin/python3"}
    assert resolve_command("train", None, ["-x"], python=True, env=env) == (
        "/opt/py/bin/python3",
        "-u",
        str(here / "train"),
        "-x",
    )
    assert resolve_command("tool.py", None, [], python=True, env=env)[2] == str(here / "tool.py")
    # the file must exist: a program on PATH is not looked for
    for missing in ("mytool", "nope", "nope.py"):
        with pytest.raises(ConfigError) as info:
            resolve_command(missing, None, [], python=True, env=env)
        assert str(info.value) == f"job.entrypoint={missing}: no such file (relative to {here})"


def test_python_false_runs_the_entrypoint_as_a_program(here: Path) -> None:
    env = _env(here)
    # a path with a "/" as it is (made absolute), even a .py file: its shebang decides
    assert resolve_command("./tool.py", None, ["a"], python=False, env=env) == (
        str(here / "tool.py"),
        "a",
    )
    assert resolve_command(str(here / "bin" / "mytool"), None, [], python=False, env=env) == (
        str(here / "bin" / "mytool"),
    )
    # a bare name from PATH only (as execvp finds it)
    assert resolve_command("mytool", None, [], python=False, env=env) == (
        str(here / "bin" / "mytool"),
    )
    os.symlink(here / "tool.py", here / "link")  # argv[0] keeps the link's name
    assert resolve_command("./link", None, [], python=False, env=env) == (str(here / "link"),)


@pytest.mark.parametrize(
    ("entrypoint", "why"),
    [
        ("./nope", "no such file (relative to {here})"),
        ("./train.py", "not an executable file (job.python=false runs it as a program: chmod"),
        ("./bin", "not an executable file"),
        ("nope", "no executable of that name on PATH (job.python=false runs it as a program)"),
        ("tool.py", "no executable of that name on PATH (job.python=false runs it as a program; "),
    ],
)
def test_python_false_errors_are_one_line_naming_the_key(
    here: Path, entrypoint: str, why: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_command(entrypoint, None, [], python=False, env=_env(here))
    message = str(info.value)
    assert message.startswith(f"job.entrypoint={entrypoint}: {why.format(here=here)}")
    assert "\n" not in message
    if entrypoint == "tool.py":  # the file is here, but not on PATH: the fix is named
        assert message.endswith(f"./tool.py for the file in {here})")


def test_a_module_runs_with_python_and_refuses_python_false(here: Path) -> None:
    for python in (None, True):
        assert resolve_command("", "pkg.mod", ["a"], python=python, env={}) == (
            sys.executable,
            "-u",
            "-m",
            "pkg.mod",
            "a",
        )
    with pytest.raises(ConfigError, match=r"^job.python=false: not with job.module"):
        resolve_command(None, "pkg.mod", [], python=False, env={})
