"""``python -m elastic_runner.torchrun ARGS...``: what ``python -m torch.distributed.run
ARGS...`` does, under elastic-run (the same as ``elastic-run torchrun ARGS...``)."""

from __future__ import annotations

import sys

from elastic_runner import cli

if __name__ == "__main__":
    sys.argv[1:1] = ["torchrun"]
    sys.argv[0] = "elastic-run"
    cli.main()
