"""A small torch DDP training (gloo, CPU) on synthetic data, with checkpoint and resume.

Run it under elastic-run (``elastic-run +job=resnet``) or torchrun; it reads only the
standard torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...). Run
directly with ``python train.py`` it trains as a single process (world size 1).

Checkpoint semantics: ``--epochs`` is the *total* number of epochs. At the end of every
epoch rank 0 atomically writes ``<checkpoint-dir>/latest.pt`` (model, optimizer, number
of completed epochs). On start every rank loads that file if present and continues with
the next epoch; if all epochs are already done it trains nothing and exits 0.

``--fail-at-step N --fail-rank R`` makes global rank R SIGKILL itself right before global
step N (1-based, counted across epochs) on the first attempt only
(TORCHELASTIC_RESTART_COUNT == "0"), to exercise elastic restarts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

try:
    import torch
    import torch.distributed as dist

    # Imported before init_process_group on purpose; see the end of main().
    import torch.distributed.nn
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
except ImportError:
    print("resnet example needs torch: pip install torch==2.13.0 (CPU build)", file=sys.stderr)
    sys.exit(1)

try:  # progress for elastic-run (its watchdog, crash-loop verdict, fault=...at_step)
    from elastic_runner import heartbeat
except ImportError:  # under plain torchrun

    def heartbeat(step: int | None = None) -> None:
        """elastic_runner is not installed: nothing to report to."""


NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
CHECKPOINT_NAME = "latest.pt"


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class TinyResNet(nn.Module):
    """Stem (stride 2) -> 2 residual blocks -> global average pool -> linear."""

    def __init__(self, channels: int = 16, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(IMAGE_SHAPE[0], channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


class SyntheticData:
    """Deterministic, learnable synthetic images: class prototype + noise.

    The prototypes are the same on every rank; each (epoch, step, rank) batch comes from
    its own seeded generator, so ranks see different shards and a resumed run sees exactly
    the batches the original run would have seen.
    """

    def __init__(self, batch_size: int, seed: int = 0) -> None:
        self.batch_size = batch_size
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn((NUM_CLASSES, *IMAGE_SHAPE), generator=gen)

    def batch(self, epoch: int, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(
            self.seed + 1 + epoch * 1_000_003 + step * 1_009 + rank * 7_919_111
        )
        labels = torch.randint(0, NUM_CLASSES, (self.batch_size,), generator=gen)
        noise = torch.randn((self.batch_size, *IMAGE_SHAPE), generator=gen)
        return self.prototypes[labels] + 1.5 * noise, labels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="total number of epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per-worker batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--checkpoint-dir", default="./checkpoints")
    parser.add_argument(
        "--fail-at-step",
        type=int,
        default=-1,
        help="SIGKILL --fail-rank right before this global step (1-based) on restart 0",
    )
    parser.add_argument("--fail-rank", type=int, default=-1, help="global rank to kill")
    return parser.parse_args(argv)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, then atomically replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def maybe_fail(args: argparse.Namespace, rank: int, global_step: int) -> None:
    if (
        global_step == args.fail_at_step
        and rank == args.fail_rank
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    ):
        print(f"rank {rank}: simulated failure at step {global_step} (SIGKILL)", flush=True)
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Standalone `python train.py`: behave as a world of one.
    for key, default in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ):
        os.environ.setdefault(key, default)
    torch.set_num_threads(1)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    started = time.monotonic()

    torch.manual_seed(0)
    model = TinyResNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    ckpt_path = Path(args.checkpoint_dir) / CHECKPOINT_NAME
    start_epoch = 0  # number of epochs already completed
    state = load_checkpoint(ckpt_path)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
    # Every rank read the file itself; make sure they all agree before training.
    agreed = torch.tensor([start_epoch, -start_epoch], dtype=torch.int64)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    if int(agreed[0]) != -int(agreed[1]):
        raise RuntimeError(f"ranks loaded different checkpoints: epochs {agreed.tolist()}")
    if rank == 0:
        if state is not None:
            print(f"loaded checkpoint {ckpt_path}", flush=True)
            print(f"resumed from epoch {start_epoch}", flush=True)
        print(
            f"training: world_size={world_size} epochs={args.epochs} "
            f"start_epoch={start_epoch + 1} restart={restart}",
            flush=True,
        )
        if start_epoch >= args.epochs:
            print(f"nothing to do: all {args.epochs} epochs already completed", flush=True)

    ddp_model = DistributedDataParallel(model)
    data = SyntheticData(args.batch_size)

    for epoch in range(start_epoch + 1, args.epochs + 1):
        ddp_model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of losses, number of steps)
        for step in range(1, args.steps_per_epoch + 1):
            global_step = (epoch - 1) * args.steps_per_epoch + step
            heartbeat(step=global_step)
            maybe_fail(args, rank, global_step)
            images, labels = data.batch(epoch, step, rank)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp_model(images), labels)
            loss.backward()
            optimizer.step()
            loss_sum[0] += loss.item()
            loss_sum[1] += 1
        dist.all_reduce(loss_sum)  # the mean loss over all ranks and steps
        if rank == 0:
            print(f"epoch {epoch} loss {float(loss_sum[0] / loss_sum[1]):.4f}", flush=True)
            save_checkpoint(
                ckpt_path,
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
            )
        # Nobody starts the next epoch before the checkpoint of this one is on disk.
        dist.barrier()

    if rank == 0:
        print(f"elapsed {time.monotonic() - started:.1f}s", flush=True)
        print(f"training done: epochs={args.epochs} world_size={world_size}", flush=True)

    # Teardown. gloo runs every collective on its own worker threads, and a worker drops
    # its reference to a finished collective (and so to our tensors, e.g. loss_sum) only
    # after wait() has already returned here. If the interpreter is finalizing by then,
    # that decref needs the GIL, the thread is made to exit and the process aborts
    # ("terminate called without an active exception"). destroy_process_group() rules this
    # out only if it drops the last reference to the process group: then gloo's destructor
    # joins the worker threads while the interpreter is still alive. Hence: delete the DDP
    # model (its reducer holds the group) first, and import torch.distributed.nn (which
    # DDP imports) before init_process_group, as that module, imported while a default
    # group exists, keeps it as a default argument forever.
    del ddp_model
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
