"""The examples of ``docs/python-api.md`` run as they are written.

Every fenced ``python`` block is a complete program, run as a script in a fresh directory
(``subprocess.run([sys.executable, "example.py"])``), which must exit 0. An HTML comment
on the line before a block changes that:

- ``<!-- not run -->``: not run (it needs torch);
- ``<!-- pytest -->``: a test file, run with ``python -m pytest``;
- ``<!-- file: PATH -->``: not run, but written to ``PATH`` in the directory of every
  example (a script or preset an example launches).

Every example leaves no process behind: each runs with a variable of its own in its
environment, which the agent, its helpers and the workers inherit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import assert_nothing_survives

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"

#: Marks the processes of one example run (inherited by every process it starts).
MARKER_ENV = "ELASTIC_RUNNER_DOCS_EXAMPLE"

#: Seconds one example may take (the slowest forms a two-node job: about 5 s).
TIMEOUT = 120

_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")
_HEADING = re.compile(r"^#+\s+(.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of the document."""

    language: str
    code: str
    line: int  # of the opening fence, 1-based
    section: str
    marker: str | None

    @property
    def file(self) -> str | None:
        """The path a ``<!-- file: PATH -->`` block is written to."""
        if self.marker is None or not self.marker.startswith("file:"):
            return None
        return self.marker.removeprefix("file:").strip()

    @property
    def runs(self) -> bool:
        return self.language == "python" and self.marker in (None, "pytest")

    @property
    def id(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"{slug}-line{self.line}"


def blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text``, in order, each with the marker on the line before
    it and the heading it is under."""
    found: list[Block] = []
    lines = text.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        if heading := _HEADING.match(lines[i]):
            section = heading.group(1)
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{DOC.name}:{i + 1}: a code block that is not closed"
        found.append(
            Block(
                language=fence.group(1),
                code="\n".join(lines[i + 1 : end]) + "\n",
                line=i + 1,
                section=section,
                marker=marker.group(1) if marker else None,
            )
        )
        i = end + 1
    return found


BLOCKS = blocks(DOC.read_text(encoding="utf-8"))
EXAMPLES = [block for block in BLOCKS if block.runs]


def test_the_document_has_its_examples() -> None:
    """The markers are spelled right (a misspelled one would silently skip or run a
    block) and the examples the document promises are there."""
    for block in BLOCKS:
        assert block.marker in (None, "not run", "pytest") or block.file, (
            f"{DOC.name}:{block.line}: unknown marker <!-- {block.marker} -->"
        )
    not_run = [b for b in BLOCKS if b.language == "python" and b.marker == "not run"]
    assert len(not_run) == 1 and "import torch" in not_run[0].code
    assert sum(b.marker == "pytest" for b in EXAMPLES) == 1
    assert len(EXAMPLES) >= 8
    for block in EXAMPLES:
        compile(block.code, f"{DOC.name}:{block.line}", "exec")


@pytest.mark.parametrize("block", EXAMPLES, ids=[block.id for block in EXAMPLES])
def test_example_runs(block: Block, tmp_path: Path) -> None:
    for other in BLOCKS:
        if other.file:
            path = tmp_path / other.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(other.code, encoding="utf-8")
    if block.marker == "pytest":
        (tmp_path / "test_example.py").write_text(block.code, encoding="utf-8")
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        command += ["--rootdir", str(tmp_path), "test_example.py"]
    else:
        (tmp_path / "example.py").write_text(block.code, encoding="utf-8")
        command = [sys.executable, "example.py"]
    marker = uuid.uuid4().hex
    try:
        done = subprocess.run(
            command,
            cwd=tmp_path,
            env={**os.environ, MARKER_ENV: marker},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        assert_nothing_survives({marker}, key=MARKER_ENV)
    assert done.returncode == 0, (
        f"{DOC.name}:{block.line} exited {done.returncode}\n"
        f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
