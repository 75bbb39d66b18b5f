"""An example worker for the Slurm scripts: a training loop that saves a checkpoint when
it is told to stop (SIGUSR1 before a time limit or a preemption, SIGTERM from ``scancel``
or from the agent) and resumes from it when it starts again.

It needs no torch, so it runs anywhere; the comments say where real torch code goes. Each
worker reads the variables elastic-run sets, as under torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``GROUP_RANK``, ``TORCHELASTIC_RESTART_COUNT``, ``MASTER_ADDR``,
``MASTER_PORT``).

    python train.py --steps 200 --step-seconds 0.05 --checkpoint-dir /shared/ckpt

Every worker prints one line when it starts, e.g. ``rank 3 of 6 (node 1, local_rank 1,
restart 0): starting at step 0``; rank 0 prints ``resumed from step K`` when a checkpoint
was there, ``checkpoint at step K (SIGUSR1)`` when stopped, and ``training done: N steps,
world size W`` at the end. A worker told to stop exits 0 after the checkpoint: elastic-run
then reports the run as preempted (SIGUSR1, exit 75) or stopped (SIGTERM, exit 143).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

CHECKPOINT = "checkpoint.json"

#: The signal that asked this worker to stop, once one did.
stop_requested: int | None = None


def _on_stop(signum: int, frame: FrameType | None) -> None:
    # Only note it: the loop saves the checkpoint between two steps, never in the middle.
    global stop_requested
    stop_requested = signum


def load(directory: Path) -> int:
    """The step to start from: the checkpoint's, or 0."""
    # torch: state = torch.load(directory / "latest.pt", map_location="cpu");
    #        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optim"])
    try:
        return int(json.loads((directory / CHECKPOINT).read_text())["step"])
    except FileNotFoundError:
        return 0


def save(directory: Path, step: int, world_size: int) -> None:
    """Write the checkpoint atomically: a temporary file, then a rename."""
    # torch: torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(),
    #        "step": step}, tmp), on rank 0 only, then os.replace as here
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{CHECKPOINT}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"step": step, "world_size": world_size}))
    os.replace(tmp, directory / CHECKPOINT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="total steps to reach")
    parser.add_argument("--step-seconds", type=float, default=0.05, help="time of one step")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between saves")
    parser.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path("checkpoints"),
        help="shared by every node (a shared filesystem) and kept across requeues",
    )
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    node = os.environ.get("GROUP_RANK", "0")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    signal.signal(signal.SIGUSR1, _on_stop)
    signal.signal(signal.SIGTERM, _on_stop)

    # torch: torch.cuda.set_device(local_rank); dist.init_process_group("nccl") (env://,
    #        from MASTER_ADDR/MASTER_PORT); model = DDP(Net().cuda(), device_ids=[local_rank])
    step = load(args.checkpoint_dir)
    print(
        f"rank {rank} of {world_size} (node {node}, local_rank {local_rank}, "
        f"restart {restart}): starting at step {step}",
        flush=True,
    )
    if rank == 0 and step:
        print(f"resumed from step {step}", flush=True)

    while step < args.steps:
        if stop_requested is not None:
            # torch: agree on stopping first, so that every rank stops at the same step:
            #        flag = torch.tensor([1 if stop_requested else 0]); dist.all_reduce(flag,
            #        op=MAX) each step; a rank that stops alone leaves the others hanging
            if rank == 0:
                save(args.checkpoint_dir, step, world_size)
                name = signal.Signals(stop_requested).name
                print(f"checkpoint at step {step} ({name})", flush=True)
            return 0
        time.sleep(args.step_seconds)  # torch: one batch: forward, backward, optimizer.step()
        step += 1
        if rank == 0 and step % args.checkpoint_every == 0:
            save(args.checkpoint_dir, step, world_size)

    if rank == 0:
        save(args.checkpoint_dir, step, world_size)
        print(f"training done: {step} steps, world size {world_size}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
