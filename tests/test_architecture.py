"""The architecture holds: the import contracts in pyproject.toml pass (and do fail on a
wrong import), and the agent loop imports in an interpreter without Hydra or OmegaConf."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package found in ``tree``, with the project's contracts."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = tmp_path_factory.mktemp("tree")
    shutil.copytree(
        ROOT / "elastic_runner",
        tree / "elastic_runner",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tree


def test_the_contracts_hold() -> None:
    done = _lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "wrong_import", "contract"),
    [
        ("agent.py", "import omegaconf", "The agent loop imports interfaces only"),
        ("agent.py", "import elastic_runner.events.builtin", "The agent loop imports"),
        ("workers/environment.py", "import elastic_runner.rendezvous.api", "Worker processes"),
        ("spec.py", "import elastic_runner.events.api", "No import cycles"),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    package_copy: Path, module: str, wrong_import: str, contract: str
) -> None:
    path = package_copy / "elastic_runner" / module
    original = path.read_text()
    path.write_text(original + f"\n{wrong_import}  # planted by the test\n")
    try:
        done = _lint_imports(package_copy)
    finally:
        path.write_text(original)
    assert done.returncode == 1, done.stdout + done.stderr
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken) or contract in done.stdout
    assert "1 broken" in done.stdout or "2 broken" in done.stdout


def test_the_agent_loop_imports_without_hydra_or_omegaconf() -> None:
    code = textwrap.dedent(
        """
        import sys

        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("hydra", "omegaconf"):
                    raise ImportError(f"{name} is blocked")

        sys.meta_path.insert(0, Blocked())
        import elastic_runner.agent
        import elastic_runner.events, elastic_runner.metrics, elastic_runner.timer.api
        import elastic_runner.rendezvous.api, elastic_runner.workers.launcher
        from elastic_runner.agent import ElasticAgent
        assert not any(m.split(".")[0] in ("hydra", "omegaconf") for m in sys.modules)
        print("ok", ElasticAgent.__name__)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok ElasticAgent"
    # and the blocker does block: the configuration module needs OmegaConf
    blocked = subprocess.run(
        [
            sys.executable,
            "-c",
            code.replace("import elastic_runner.agent", "import elastic_runner.config"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blocked.returncode != 0 and "omegaconf is blocked" in blocked.stderr
