"""A test worker run with ``python -m stuck_module``: on its first attempt it prints once,
then blocks in ``wait_for_collective`` under runpy's frames; on the next one it
succeeds. It imports no ``threading``, so py-spy gives its main thread no name."""

import os
import sys
import time


def wait_for_collective() -> None:
    while True:
        time.sleep(1)


if __name__ == "__main__":
    print(f"rank {os.environ['RANK']} started", flush=True)
    if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        wait_for_collective()
    assert "threading" not in sys.modules, "py-spy would name the main thread"
    sys.exit(0)
