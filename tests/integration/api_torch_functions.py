"""Worker functions for tests/integration/test_api_torch.py: each worker process of
``elastic_runner.launch`` calls one (by reference: this module imports in the worker
through the caller's ``sys.path``), with torchrun's worker environment.

torch is imported inside the functions: this module also imports where torch is not
installed (the type check, the collection of the skipped tests).
"""

from __future__ import annotations

import os
import signal
from typing import Any

__all__ = [
    "AGENT_SCRIPT",
    "dist_sum",
    "full_tensor",
    "kill_rank_1_on_first_attempt",
    "print_and_sum",
    "raise_on_rank",
]


def _rank() -> int:
    return int(os.environ["RANK"])


def full_tensor() -> Any:
    """A 100x100 tensor filled with this worker's global rank (torch's ``dummy_compute``
    returns a tensor of that shape)."""
    import torch

    return torch.full((100, 100), float(_rank()))


def dist_sum() -> int:
    """torch's ``_dist_sum``: a gloo group from the environment (``env://``), the sum of the
    ranks by ``all_reduce``; the group is destroyed before returning."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        assert dist.get_rank() == _rank()
        assert dist.get_world_size() == int(os.environ["WORLD_SIZE"])
        t = torch.tensor([_rank()], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return int(t.item())
    finally:
        dist.destroy_process_group()


def print_and_sum(marker: str) -> int:
    """``dist_sum`` that first prints ``marker`` on stdout, to find its console line."""
    print(f"{marker} from rank {_rank()}", flush=True)
    return dist_sum()


def kill_rank_1_on_first_attempt() -> dict[str, Any]:
    """torch's ``test_rank_restart_after_failure``: rank 1 SIGKILLs itself on the first
    attempt; then every rank returns its tensor, with the attempt it came from."""
    import torch

    restart = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if _rank() == 1 and restart == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"restart": restart, "tensor": torch.full((100, 100), float(_rank()))}


def raise_on_rank(bad_rank: int, message: str) -> int:
    """All ranks join a gloo group and meet at a barrier; then ``bad_rank`` raises
    ``ValueError(message)`` while the others leave the group and return their rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        dist.barrier()
        if _rank() == bad_rank:
            raise ValueError(message)
        return _rank()
    finally:
        dist.destroy_process_group()


#: One agent (node) in its own process: ``python -c AGENT_SCRIPT ROOT FUNCTION ARGS_JSON
#: OUT RUN_DIR OVERRIDES_JSON`` launches ``tests.integration.api_torch_functions.FUNCTION``
#: with those arguments and writes the result's fields to OUT as JSON (return values keyed
#: by str(rank); after a failure, the ChildFailedError's message too), then exits with the
#: result's exit code.
AGENT_SCRIPT = """
import json, sys
root, function, args, out, run_dir, overrides = sys.argv[1:7]
sys.path.insert(0, root)
import elastic_runner
from tests.integration import api_torch_functions as functions

fields = {}
try:
    result = elastic_runner.launch(
        getattr(functions, function),
        json.loads(args),
        overrides=json.loads(overrides),
        run_dir=run_dir,
        env={"GLOO_SOCKET_IFNAME": "lo"},
    )
except elastic_runner.ChildFailedError as exc:
    result, fields["error"] = exc.result, str(exc)
fields.update(
    state=result.state.value,
    exit_code=result.exit_code,
    run_id=result.run_id,
    restarts=result.restart_count,
    failed_ranks=[failure.rank for failure in result.failures],
    return_values={str(rank): value for rank, value in result.return_values.items()},
)
with open(out, "w") as f:
    json.dump(fields, f)
sys.exit(result.exit_code)
"""
