"""Where a Go server's CPU went, from its ``/debug/pprof/profile`` (etcd started with
``--enable-pprof``), without Go's toolchain: the share of a few named parts of the
server and the functions with the most cumulative CPU.

    .venv/bin/python bench/pprof_top.py /tmp/etcd.pprof.1024

``bench/scale.py --backends etcd --profile PATH`` saves such profiles (``PATH.<N>``) and
prints this for each size.

The file is a gzipped ``profile.proto`` (github.com/google/pprof, proto/profile.proto);
this reads the fields it needs: samples (location ids, values), locations (the functions
of their lines), functions (their names) and the string table.
"""

from __future__ import annotations

import argparse
import collections
import gzip
from pathlib import Path

from elastic_runner.rendezvous.etcd_proto import read_fields, read_varint

__all__ = ["PARTS", "Profile", "report"]

#: Parts of etcd a sample is counted in: the first whose frame is on its stack.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "garbage collection",
        ("runtime.gcBgMarkWorker", "runtime.gcAssistAlloc", "runtime.bgsweep"),
    ),
    (
        "HTTP/JSON gateway (its JSON, its HTTP and its call into the gRPC server)",
        ("grpc-gateway/runtime", "net/http.(*conn).serve", "wsproxy"),
    ),
    (
        "gRPC server: the requests themselves (the gateway passes each on over gRPC)",
        ("google.golang.org/grpc.(*Server).handleStream",),
    ),
    ("raft and its log (WAL)", ("go.etcd.io/etcd/raft", "go.etcd.io/etcd/wal")),
    ("storage backend (bbolt)", ("go.etcd.io/bbolt", "mvcc/backend")),
)


def _ints(value: int | bytes) -> list[int]:
    """A repeated integer field: one value, or several packed."""
    if isinstance(value, int):
        return [value]
    out, i = [], 0
    while i < len(value):
        item, i = read_varint(value, i)
        out.append(item)
    return out


class Profile:
    """A CPU profile's samples, each its stack (innermost first) and its CPU in ns."""

    def __init__(self, path: Path) -> None:
        data = gzip.decompress(path.read_bytes())
        strings: list[str] = []
        raw_samples: list[tuple[list[int], list[int]]] = []
        locations: dict[int, list[int]] = {}
        functions: dict[int, int] = {}
        for number, _, value in read_fields(data):
            if number == 6 and isinstance(value, bytes):
                strings.append(value.decode(errors="replace"))
            elif number == 2 and isinstance(value, bytes):
                ids: list[int] = []
                values: list[int] = []
                for n, _, v in read_fields(value):
                    (ids if n == 1 else values if n == 2 else []).extend(_ints(v))
                raw_samples.append((ids, values))
            elif number == 4 and isinstance(value, bytes):
                location, lines = 0, []
                for n, _, v in read_fields(value):
                    if n == 1 and isinstance(v, int):
                        location = v
                    elif n == 4 and isinstance(v, bytes):
                        lines += [f for m, _, f in read_fields(v) if m == 1 and isinstance(f, int)]
                locations[location] = lines
            elif number == 5 and isinstance(value, bytes):
                function = name = 0
                for n, _, v in read_fields(value):
                    if n == 1 and isinstance(v, int):
                        function = v
                    elif n == 2 and isinstance(v, int):
                        name = v
                functions[function] = name
        #: (stack of function names, innermost first; CPU ns): a sample's last value is
        #: its CPU time (the first, its count).
        self.samples = [
            (
                [strings[functions[f]] for loc in ids for f in locations.get(loc, [])],
                values[-1],
            )
            for ids, values in raw_samples
            if values
        ]
        self.total_ns = sum(ns for _, ns in self.samples)


def report(profile: Profile, top: int = 25) -> str:
    """The share of each of :data:`PARTS`, then the ``top`` functions by cumulative CPU."""
    total = profile.total_ns or 1
    parts: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    for stack, ns in profile.samples:
        part = next(
            (name for name, frames in PARTS if any(f in s for s in stack for f in frames)),
            "other",
        )
        parts[part] += ns
        for name in set(stack):
            cumulative[name] += ns
    lines = [f"CPU in the profile: {profile.total_ns / 1e9:.2f} s"]
    lines += [f"  {100 * ns / total:5.1f} %  {name}" for name, ns in parts.most_common()]
    lines.append(f"functions by cumulative CPU (top {top}):")
    lines += [f"  {100 * ns / total:5.1f} %  {name}" for name, ns in cumulative.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path, help="a gzipped profile.proto (Go's pprof)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(report(Profile(args.profile), args.top))


if __name__ == "__main__":
    main()
