"""A test worker proving MASTER_ADDR:MASTER_PORT usable the way torch uses it: rank 0
listens on MASTER_PORT (every interface, SO_REUSEADDR, like torch's TCPStore on worker
rank 0) until every other rank connected and sent its rank; the others connect to
MASTER_ADDR:MASTER_PORT, retrying until rank 0 listens.

Writes ``<out>/r<RANK>.json``: the environment, and for rank 0 the ranks that reached it.
Exits 1 (with the reason on stderr) when rank 0 cannot bind or a rank is missing after
``--timeout`` seconds.
"""

import argparse
import json
import os
import socket
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--timeout", type=float, default=30.0)
args = p.parse_args()

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
deadline = time.monotonic() + args.timeout
record: dict[str, object] = {"env": dict(os.environ)}

if rank == 0:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("", port))
    except OSError as exc:
        sys.exit(f"rank 0 cannot bind MASTER_PORT={port}: {exc}")
    server.listen(world)
    reached: list[int] = []
    while len(reached) < world - 1:
        server.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            conn, _ = server.accept()
        except TimeoutError:
            sys.exit(f"only ranks {sorted(reached)} reached {addr}:{port}")
        with conn:
            conn.settimeout(5)
            reached.append(int(conn.recv(16).decode()))
    record["reached"] = sorted(reached)
    server.close()
else:
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2) as conn:
                conn.sendall(str(rank).encode())
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                sys.exit(f"rank {rank} cannot reach {addr}:{port}: {exc}")
            time.sleep(0.05)

path = os.path.join(args.out, f"r{rank}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
