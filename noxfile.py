"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``,
``nox -s plugins`` (installs each package in plugins/ and runs its tests),
``nox -s integration`` (installs torch==2.13.0, CPU build, and runs the examples)."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "plugins"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"  # pinned: an unpinned torch downloads GBs of CUDA wheels
PLUGINS = sorted(str(p) for p in Path("plugins").iterdir() if (p / "pyproject.toml").exists())


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("pytest", "-n", "2", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the architecture's import contracts (pyproject.toml, [tool.importlinter])."""
    session.install("ruff>=0.6", "import-linter>=2.3,<3", "-e", ".")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("lint-imports", "--no-cache")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]", *(f"-e{p}" for p in PLUGINS))
    session.run("mypy")
    for plugin in PLUGINS:
        session.run("mypy", "--strict", "--explicit-package-bases", plugin)


@nox.session
def plugins(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    for plugin in PLUGINS:
        session.install("-e", f"{plugin}[test]")
    for plugin in PLUGINS:
        session.run("pytest", "-n", "2", f"{plugin}/tests", *session.posargs)


@nox.session
def integration(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("pytest", "-n", "2", "-m", "integration", "tests/integration", *session.posargs)
