"""``python -m elastic_runner plugins [--json]``: what the installed plugins provide.
``python -m elastic_runner verdict DIR``: the job's own result from every node's
``result.json`` under DIR, as an exit code (:mod:`elastic_runner.verdict`).

(``elastic-run``'s own arguments belong to Hydra, hence a separate entry point.)
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from elastic_runner.inventory import format_json, format_text, inventory
from elastic_runner.plugins import PluginLoadWarning, load_plugins
from elastic_runner.registry import PluginError

__all__ = ["EXIT_PLUGIN_ERROR", "main"]

#: A plugin elastic-run cannot use (a misspelled hook, a failing component hook ...):
#: the exit code of a configuration error, as ``elastic-run`` gives.
EXIT_PLUGIN_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m elastic_runner")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser(
        "plugins", help="list installed plugins, what each provides and where it comes from"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    judge = commands.add_parser(
        "verdict",
        help="exit with the job's own result, from every node's result.json under DIR "
        "(0 when the job succeeded, nodes lost on the way aside)",
    )
    judge.add_argument("dir", type=Path, help="the job's directory (every node's run dir under it)")
    args = parser.parse_args(argv)
    if args.command == "verdict":
        from elastic_runner.verdict import verdict

        if not args.dir.is_dir():
            print(f"{parser.prog} verdict: error: no directory {args.dir}", file=sys.stderr)
            return EXIT_PLUGIN_ERROR
        code, line = verdict(args.dir)
        print(line, flush=True)
        return code
    try:
        with warnings.catch_warnings():
            # broken plugins are listed with their error instead
            warnings.simplefilter("ignore", PluginLoadWarning)
            loaded = load_plugins()
        entries = inventory(loaded)
    except PluginError as exc:  # one line naming the plugin, as argparse words an error
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_PLUGIN_ERROR
    print(format_json(entries) if args.json else format_text(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
