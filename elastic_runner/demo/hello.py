"""Each worker prints its rank and the world size, then exits 0."""

import os
import socket


def main() -> None:
    print(
        f"hello from rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} "
        f"(local rank {os.environ['LOCAL_RANK']} on {socket.gethostname()}, "
        f"restart {os.environ['TORCHELASTIC_RESTART_COUNT']})",
        flush=True,
    )


if __name__ == "__main__":
    main()
