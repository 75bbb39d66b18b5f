"""A test worker on a node that fails its first attempts: records what it saw, then
behaves by the node it runs on (``NODE_TAG`` in its environment, ``job.env``).

Writes ``<out>/<node tag>_<pid>.json`` (ranks, world size, restart count, start time);
then on the node tagged ``--bad`` exits 1 the first ``--fails`` times it runs there
(counted in ``<out>/fails``), once the file ``--go`` exists when given; elsewhere, or
after that, sleeps unless ``WORLD_SIZE`` is ``--until-world``, then sleeps ``--sleep``
and exits 0.
"""

import argparse
import json
import os
import sys
import time

started = time.time()
p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--bad", required=True)
p.add_argument("--fails", type=int, default=2)
p.add_argument("--until-world", type=int, default=0)
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--go", default="")
args = p.parse_args()

tag = os.environ.get("NODE_TAG", "")
record = {
    "tag": tag,
    "rank": int(os.environ["RANK"]),
    "group_rank": int(os.environ["GROUP_RANK"]),
    "world": int(os.environ["WORLD_SIZE"]),
    "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
    "started": started,
}
path = os.path.join(args.out, f"{tag}_{os.getpid()}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
if tag == args.bad:
    count_file = os.path.join(args.out, "fails")
    count = 0
    if os.path.exists(count_file):
        with open(count_file) as f:
            count = int(f.read())
    if count < args.fails:
        while args.go and not os.path.exists(args.go):
            time.sleep(0.02)
        with open(count_file, "w") as f:
            f.write(str(count + 1))
        print(f"node {tag}: failing ({count + 1} of {args.fails})", file=sys.stderr, flush=True)
        sys.exit(1)
if args.until_world and record["world"] != args.until_world:
    time.sleep(60)
time.sleep(args.sleep)
