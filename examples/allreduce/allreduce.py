"""Smallest torch.distributed check: every worker all-reduces (SUM) its rank over gloo.

Each worker joins the process group from the torchrun environment (env://), sums the
ranks of all workers, checks the result is ``sum(range(world_size))``, and writes
``<--out>/rank<RANK>.json`` with what it saw. Exits 1 if the sum is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import torch
    import torch.distributed as dist
except ImportError:
    print("allreduce example needs torch: pip install torch==2.13.0 (CPU build)", file=sys.stderr)
    sys.exit(1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default="allreduce-out", help="directory for the rank<RANK>.json files"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        world_size = dist.get_world_size()
        value = torch.tensor([rank], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        total = int(value.item())
    finally:
        # This drops the last reference to the process group, so gloo joins its worker
        # threads here, while the interpreter is alive; see the end of resnet/train.py.
        dist.destroy_process_group()

    expected = sum(range(world_size))
    result = {
        "rank": rank,
        "world_size": world_size,
        "sum": total,
        "expected": expected,
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "group_rank": int(os.environ.get("GROUP_RANK", "0")),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rank{rank}.json"
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)

    if total != expected:
        print(
            f"allreduce FAILED: rank {rank} sum {total} != expected {expected} "
            f"(world_size {world_size})",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"allreduce ok: rank {rank} sum {total}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
