"""``rdzv=redis``'s factory: one line per bad key, checked before anything connects."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from elastic_runner_redis import RedisRendezvousConfig
from elastic_runner_redis.plugin import make_rendezvous

from elastic_runner.errors import ConfigError
from elastic_runner.spec import RunContext


def _context(tmp_path: Path) -> RunContext:
    return RunContext(run_id=uuid.uuid4().hex[:8], run_dir=tmp_path, node="here")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"endpoint": "a:1,b:2"}, "rdzv.endpoint=a:1,b:2: rdzv=redis takes one host:port"),
        ({"endpoint": "a:x"}, "rdzv.endpoint=a:x: expected host:port[,host:port...]"),
        ({"db": -1}, "rdzv.db=-1: expected a database number >= 0"),
        ({"id": None}, "rdzv.id=(unset): rdzv=redis needs a job id shared by all nodes"),
    ],
)
def test_bad_keys_are_one_line(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    config = RedisRendezvousConfig(id="job")
    for key, value in changes.items():
        setattr(config, key, value)
    with pytest.raises(ConfigError) as caught:
        make_rendezvous(config, _context(tmp_path))
    assert str(caught.value).startswith(message)
    assert len(str(caught.value).splitlines()) == 1
