"""Put on workers' PYTHONPATH by elastic-run (``watchdog``): arms Python's faulthandler so
that signal ``$ELASTIC_RUNNER_STACKS_SIGNAL`` writes every thread's stack to
``$ELASTIC_RUNNER_STACKS_DIR/<pid>.txt``. faulthandler writes from the C signal handler,
so this works even while the main thread is stuck in C code (a collective, a lock).
Then the ``sitecustomize`` this one shadows, if there is one, runs as usual."""

import os


def _arm() -> None:
    directory = os.environ.get("ELASTIC_RUNNER_STACKS_DIR")
    signum = os.environ.get("ELASTIC_RUNNER_STACKS_SIGNAL")
    if not directory or not signum or not signum.isdigit():
        return
    import faulthandler

    try:
        file = open(os.path.join(directory, f"{os.getpid()}.txt"), "w")  # noqa: SIM115
        faulthandler.register(int(signum), file=file, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError):
        return
    globals()["_dump_file"] = file  # faulthandler needs the file to stay open


def _chain() -> None:
    import importlib.machinery
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_arm()
os.register_at_fork(after_in_child=_arm)  # a forked child dumps into a file of its own
_chain()
