"""Where worker output goes under a torchrun command line: ``--redirects``, ``--tee`` and
``--local-ranks-filter`` as ``logs.console_streams`` / ``logs.console_local_ranks``, and
``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE`` as ``logs.prefix``."""

from __future__ import annotations

import re
import string
from typing import Any

from elastic_runner.torchrun.options import TorchrunArgs, TorchrunUsageError

__all__ = ["console_values", "log_prefix_from_template"]

#: torch's ``Std``: 0 none, 1 stdout, 2 stderr, 3 both; or ``local_rank:value,...``.
_STD_VALUE = re.compile(r"^[0123]$")
_STD_MAPPING = re.compile(r"^(\d:[0123],)*(\d:[0123])$")
_STREAMS = {0: frozenset(), 1: frozenset({"stdout"}), 2: frozenset({"stderr"})}
_STREAMS[3] = _STREAMS[1] | _STREAMS[2]


def _streams(option: str, text: str) -> dict[int, frozenset[str]] | frozenset[str]:
    """torch's ``Std.from_str``: the streams per local rank, or for every rank."""
    if _STD_VALUE.match(text):
        return _STREAMS[int(text)]
    if _STD_MAPPING.match(text):
        return {int(r): _STREAMS[int(v)] for r, v in (item.split(":") for item in text.split(","))}
    raise TorchrunUsageError(
        f"{option}={text!r}: expected 0 (none), 1 (stdout), 2 (stderr), 3 (both) or "
        "local_rank:value pairs such as 0:3,1:0"
    )


def console_values(args: TorchrunArgs, values: dict[str, Any], notes: list[str]) -> None:
    """Which local ranks' streams reach the console: torchrun shows a stream unless
    ``--redirects`` sends it to files only, or ``--tee`` copies it back, and only the
    local ranks of ``--local-ranks-filter``. elastic-run shows the same streams of every
    rank that shows any (``logs.console_streams``, ``logs.console_local_ranks``): exact
    unless ranks show different streams, or a word such as ``auto`` leaves the ranks a
    mapping does not name unknown until the count (a note says so)."""
    redirects = _streams("--redirects", args.redirects)
    tee = _streams("--tee", args.tee)
    ranks_filter: list[int] | None = None
    if args.local_ranks_filter:
        try:
            ranks_filter = sorted({int(r) for r in args.local_ranks_filter.split(",")})
        except ValueError:
            raise TorchrunUsageError(
                f"--local-ranks-filter={args.local_ranks_filter!r}: expected a comma-separated "
                "list of integers, e.g. --local-ranks-filter=0,1,2"
            ) from None

    def of(spec: dict[int, frozenset[str]] | frozenset[str], rank: int) -> frozenset[str]:
        return spec.get(rank, frozenset()) if isinstance(spec, dict) else spec

    def shown(rank: int) -> frozenset[str]:  # rank -1: one no mapping names
        return (_STREAMS[3] - of(redirects, rank)) | of(tee, rank)

    named = sorted({r for spec in (redirects, tee) if isinstance(spec, dict) for r in spec})
    nproc = values.get("job.nproc_per_node")
    everyone: list[int] | None = None  # every local rank, when known
    if isinstance(nproc, int) and nproc > 0:
        everyone = list(range(nproc))
    # the ranks that may show anything, when they can be listed
    ranks = ranks_filter if ranks_filter is not None else everyone
    if ranks is None and named and not shown(-1):
        ranks = named  # the ranks no mapping names show nothing
    if ranks is None:  # any number of ranks, those no mapping names alike
        each = {r: shown(r) for r in named}
        union = frozenset().union(shown(-1), *each.values())
        exact = all(s == union for s in [shown(-1), *each.values()])
    else:
        each = {r: shown(r) for r in ranks}
        union = frozenset().union(*each.values())
        exact = all(not s or s == union for s in each.values())
        listed = [r for r in ranks if each[r]]
        if union and (ranks_filter is not None or listed != everyone):
            values["logs.console_local_ranks"] = listed
    values["logs.console_streams"] = sorted(union)
    if not exact:
        notes.append(
            "--redirects/--tee per local rank: the console shows "
            f"{' and '.join(sorted(union))} of every rank that shows any "
            "(files get everything)"
        )


def log_prefix_from_template(template: str) -> str:
    """``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE`` (``string.Template`` of ``role_name``,
    ``rank``, ``local_rank``) as a ``logs.prefix`` (``str.format`` of ``role``, ``rank``,
    ``local_rank``). Other ``$names`` stay as written, as torch's ``safe_substitute``
    leaves them."""
    fields = {"role_name": "{role}", "rank": "{rank}", "local_rank": "{local_rank}"}
    out: list[str] = []
    pattern = string.Template.pattern
    last = 0
    for match in pattern.finditer(template):
        out.append(template[last : match.start()].replace("{", "{{").replace("}", "}}"))
        name = match.group("named") or match.group("braced")
        if match.group("escaped") is not None:
            out.append("$")
        elif name in fields:
            out.append(fields[name])
        else:
            out.append(match.group(0).replace("{", "{{").replace("}", "}}"))
        last = match.end()
    out.append(template[last:].replace("{", "{{").replace("}", "}}"))
    return "".join(out)
