"""Several "hosts" on one machine for multi-node tests: Linux network namespaces on a bridge.

A :class:`Cluster` of N hosts is a bridge in the root namespace, one network namespace per
host joined to it by a veth pair, an address per host in a private /24, and, per host, its
own ``/etc/hosts`` (``ip netns exec`` bind-mounts ``/etc/netns/<namespace>/hosts`` over
``/etc/hosts``) and its own hostname (each command runs in a fresh UTS namespace whose
hostname is the host's name)::

    from elastic_runner.testing.netns import Cluster

    with Cluster(3) as cluster:
        host0, host1, host2 = cluster.hosts
        server = host1.popen([sys.executable, "server.py", "--port", "29400"])
        host0.run([sys.executable, "client.py", "host1:29400"])   # host1 resolves in host0
        cluster.cut(host1)      # host1's link down: no traffic either way
        cluster.restore(host1)
        cluster.freeze(server)  # SIGSTOP; cluster.thaw(server) is SIGCONT

Everything a cluster made (processes, namespaces, links, ``/etc/netns`` directories) is
removed when it closes, also when the test failed; what a crashed run left behind is swept
by the next cluster that starts (:func:`sweep_leftovers`). In pytest, use the
``netns_cluster`` fixture of :mod:`elastic_runner.testing.fixtures`: it skips the test with
one clear reason where namespaces cannot be made (not root, no ``ip``, no capability).

Needs root, iproute2 (``ip``, ``tc``), util-linux (``unshare``) and ``hostname``.

Traffic stays on the machine: the hosts' addresses are in 198.18.0.0/15 (reserved for
benchmarking network devices, so no real network uses it), a host namespace has no route
but its own /24, and the root namespace reaches the hosts only through the bridge's
address in the same /24 (:attr:`Cluster.bridge_address`).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, Union

import psutil

__all__ = [
    "PREFIX",
    "SUBNETS",
    "Cluster",
    "Host",
    "HostRef",
    "NetemUnavailable",
    "NetnsError",
    "NetnsUnavailable",
    "namespace_processes",
    "netns_unavailable_reason",
    "sweep_leftovers",
]

PREFIX = "erk"
"""Every namespace, link and ``/etc/netns`` directory of the kit starts with this, then
the creating process's pid (6 hex digits) and 3 random hex digits: the cluster's *tag*.
The pid is what lets :func:`sweep_leftovers` tell a crashed run's leftovers from a live
cluster of a parallel test worker."""

SUBNETS = ipaddress.IPv4Network("198.18.0.0/15")
"""Where each cluster's /24 comes from (RFC 2544 benchmarking addresses: not used by real
networks, so they overlap no LAN or VPN route of the machine)."""

NETNS_RUN = Path("/run/netns")  # where `ip netns add` pins the namespaces
NETNS_ETC = Path("/etc/netns")  # what `ip netns exec` bind-mounts over /etc

# The interface name limit is 15 characters: "erk" + 6 + 3 + "br" or "v" + 2 digits fit.
_TAG = re.compile(rf"^{PREFIX}([0-9a-f]{{6}})([0-9a-f]{{3}})")
_MAX_HOSTS = 99
# A hostname: dot-separated DNS labels, 63 characters at most (sethostname allows 64).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,63}}$){_LABEL}(?:\.{_LABEL})*$")
_ROUTE_TYPES = {
    "unicast",
    "local",
    "broadcast",
    "multicast",
    "throw",
    "unreachable",
    "prohibit",
    "blackhole",
    "nat",
    "anycast",
}
# The device inside each namespace; it cannot clash with the root namespace's eth0 because
# the veth's peer is created directly in the namespace.
_INNER_DEV = "eth0"


class NetnsError(RuntimeError):
    """A command of the kit failed (``ip``, ``tc``), or teardown left something behind."""


class NetnsUnavailable(NetnsError):
    """Network namespaces cannot be made here; the message says why (tests skip on it)."""


class NetemUnavailable(NetnsError):
    """``tc qdisc ... netem`` is not supported by this kernel or this ``tc``; the message
    says what is missing (tests skip on it)."""


def _cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise NetnsError(
            f"`{shlex.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    return done


def _tag_pid(tag: str) -> int:
    return int(tag[len(PREFIX) : len(PREFIX) + 6], 16)


@cache
def netns_unavailable_reason() -> str | None:
    """Why network namespaces cannot be made by this process, or None when they can.

    Probed once per process: it creates (and removes) a namespace and a bridge, and sets a
    hostname in a new UTS namespace, which is everything a :class:`Cluster` needs."""
    return _probe()


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "not root (namespaces, bridges and veth pairs need CAP_SYS_ADMIN, CAP_NET_ADMIN)"
    for tool, package in (("ip", "iproute2"), ("unshare", "util-linux"), ("hostname", "hostname")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (install {package})"
    tag = f"{PREFIX}{os.getpid():06x}{secrets.randbelow(0x1000):03x}"
    steps = [
        ["ip", "netns", "add", f"{tag}-probe"],
        ["ip", "link", "add", f"{tag}pb", "type", "bridge"],
        ["unshare", "--uts", "--", "hostname", "probe"],
    ]
    try:
        for argv in steps:
            done = _cmd(argv, check=False)
            if done.returncode != 0:
                return f"`{shlex.join(argv)}` failed: {done.stderr.strip() or done.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`{shlex.join(argv)}` failed: {exc}"
    finally:
        _cmd(["ip", "link", "del", f"{tag}pb"], check=False)
        _cmd(["ip", "netns", "del", f"{tag}-probe"], check=False)
    return None


def _state_dir() -> Path:
    """The registry of live clusters (a JSON file per cluster) and the kit's lock file."""
    base = Path("/run") if os.access("/run", os.W_OK) else Path(tempfile.gettempdir())
    path = base / "elastic-runner-netns"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    """Serializes subnet choice, registry writes and sweeps between processes (parallel
    pytest-xdist workers start clusters at the same time)."""
    state = _state_dir()
    with open(state / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield state
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def namespace_processes(namespace: str) -> list[psutil.Process]:
    """The live processes inside network namespace ``namespace`` (by ``ip netns`` name),
    whoever started them: their ``/proc/<pid>/ns/net`` is the namespace's inode."""
    try:
        pinned = os.stat(NETNS_RUN / namespace)
    except OSError:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(f"/proc/{entry.name}/ns/net")
            if (ns.st_dev, ns.st_ino) == (pinned.st_dev, pinned.st_ino):
                found.append(psutil.Process(int(entry.name)))
        except (OSError, psutil.Error):
            continue  # exited meanwhile
    return found


def _kill(procs: Sequence[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGKILL ``procs`` (SIGCONT first, for stopped ones); returns those still alive after
    ``timeout`` s."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    # Polled rather than psutil.wait_procs: a zombie counts as gone here (its parent, the
    # test or init, reaps it), and wait_procs waits on each in turn.
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if _is_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.005)
    return alive


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _creator_alive(tag: str, state: Path) -> bool:
    """Whether the process that made cluster ``tag`` still runs (a reused pid does not
    count when the registry recorded the creator's start time)."""
    pid = _tag_pid(tag)
    if pid == os.getpid():
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except psutil.Error:
        return False
    try:
        recorded = json.loads((state / f"{tag}.json").read_text())["create_time"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return abs(float(recorded) - created) < 1.0


def sweep_leftovers() -> list[str]:
    """Remove what clusters whose creating process is dead left behind: the processes in
    their namespaces, the namespaces, links, ``/etc/netns`` directories and registry files.
    Returns what was removed. Every :meth:`Cluster.start` calls it first."""
    with _locked() as state:
        return _sweep(state)


def _sweep(state: Path) -> list[str]:
    found: dict[str, dict[str, list[str]]] = {}

    def note(kind: str, name: str) -> None:
        if m := _TAG.match(name):
            tag = PREFIX + m.group(1) + m.group(2)
            found.setdefault(tag, {}).setdefault(kind, []).append(name)

    for kind, folder in (
        ("netns", NETNS_RUN),
        ("link", Path("/sys/class/net")),
        ("dir", NETNS_ETC),
    ):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                note(kind, name)
    for path in state.glob(f"{PREFIX}*.json"):
        note("registry", path.name)
    removed: list[str] = []
    for tag, items in sorted(found.items()):
        if _creator_alive(tag, state):
            continue
        for namespace in items.get("netns", []):
            _kill(namespace_processes(namespace))
        # Links first: deleting the root end of a veth deletes its peer at once, whereas a
        # namespace is destroyed asynchronously once its last user is gone.
        for link in sorted(items.get("link", []), key=lambda name: name.endswith("br")):
            if _cmd(["ip", "link", "del", link], check=False).returncode == 0:
                removed.append(f"link {link}")
        for namespace in items.get("netns", []):
            if _cmd(["ip", "netns", "del", namespace], check=False).returncode == 0:
                removed.append(f"netns {namespace}")
        for name in items.get("dir", []):
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
            removed.append(f"dir {NETNS_ETC / name}")
        for name in items.get("registry", []):
            with contextlib.suppress(OSError):
                (state / name).unlink()
                removed.append(f"registry {state / name}")
    if removed:
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()  # only when empty: other clusters may use it
    return removed


def _taken_networks(state: Path) -> list[ipaddress.IPv4Network]:
    """Networks the root namespace already routes or has addresses in, and those of the
    other clusters' registries."""
    taken: list[ipaddress.IPv4Network] = []

    def add(text: str) -> None:
        with contextlib.suppress(ValueError):
            net = ipaddress.ip_network(text, strict=False)
            if isinstance(net, ipaddress.IPv4Network):
                taken.append(net)

    for line in _cmd(["ip", "-4", "-o", "addr", "show"], check=False).stdout.splitlines():
        words = line.split()
        if "inet" in words[:-1]:
            add(words[words.index("inet") + 1])
    for line in _cmd(
        ["ip", "-4", "route", "show", "table", "all"], check=False
    ).stdout.splitlines():
        words = line.split()
        if words and words[0] in _ROUTE_TYPES:
            words = words[1:]
        if words and words[0] != "default":
            add(words[0])
    for path in state.glob(f"{PREFIX}*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            add(json.loads(path.read_text())["subnet"])
    return taken


HostRef = Union["Host", str, int]
"""A host given as a :class:`Host`, its name or its index in the cluster."""


@dataclass(eq=False)
class Host:
    """One host of a :class:`Cluster`: a network namespace with an address, a name and
    its own ``/etc/hosts``. Commands run on it see ``socket.gethostname() == name``."""

    cluster: Cluster = field(repr=False)
    index: int
    name: str
    namespace: str
    """The ``ip netns`` name (``ip netns exec <namespace> ...``)."""
    address: str
    """The host's IPv4 address on the cluster's bridge."""
    veth: str
    """The root-namespace end of the host's veth pair (its link, as :meth:`Cluster.cut`
    sees it); the namespace end is ``eth0``."""

    @property
    def interface(self) -> str:
        """The host's network interface, seen from inside (``GLOO_SOCKET_IFNAME``)."""
        return _INNER_DEV

    @property
    def hosts_file(self) -> Path:
        """The file that is ``/etc/hosts`` for processes on this host."""
        return NETNS_ETC / self.namespace / "hosts"

    def command(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` prefixed to run on this host: in its network namespace (with its
        ``/etc`` files) and in a new UTS namespace whose hostname is the host's name.

        ``ip netns exec`` and ``unshare`` exec rather than fork, and ``sh`` execs the
        command, so the pid of a process started with this prefix is the command's own."""
        if not argv:
            raise ValueError("empty command")
        return [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            'hostname "$0" && exec "$@"',
            self.name,
            *(os.fspath(arg) for arg in argv),
        ]

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on this host (:class:`subprocess.Popen` keyword arguments pass
        through). Unless given, stdin is ``/dev/null`` and the process starts a new session
        (its own process group). Returns once the process is inside the host's namespace;
        its pid is the command's own (see :meth:`command`). The cluster kills it, with its
        whole tree, when it closes."""
        if self.cluster._closed:
            raise RuntimeError("the cluster is closed")
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(argv), **kwargs)
        self.cluster._started.append(proc)
        self._wait_inside(proc)
        return proc

    def _wait_inside(self, proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
        """Return once ``proc`` has entered the namespace (``ip netns exec`` has set it up),
        so that :meth:`processes` lists it from now on; the command itself follows within
        milliseconds (``unshare``, then ``sh`` sets the hostname and execs it)."""
        try:
            pinned = os.stat(NETNS_RUN / self.namespace)
        except OSError:
            return
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                ns = os.stat(f"/proc/{proc.pid}/ns/net")
            except OSError:
                return
            if (ns.st_dev, ns.st_ino) == (pinned.st_dev, pinned.st_ino):
                return
            time.sleep(0.001)

    def run(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float | None = 60.0,
        check: bool = False,
        input: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to completion, capturing its output as text."""
        return subprocess.run(
            self.command(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )

    def processes(self) -> list[psutil.Process]:
        """Every live process on this host (in its network namespace), whoever started it."""
        return namespace_processes(self.namespace)

    def set_hosts_entry(self, name: str, address: str | None) -> None:
        """Shorthand for :meth:`Cluster.set_hosts_entry` on this host."""
        self.cluster.set_hosts_entry(self, name, address)


class Cluster:
    """N hosts as network namespaces on a bridge; a context manager that removes all it
    made on exit. Hosts are ``host0``, ``host1``, ... unless ``names`` are given.

    Each host's ``/etc/hosts`` maps ``localhost`` and every host's name (its own too) to
    the host's address; change it per host with :meth:`set_hosts_entry`, also while
    processes run (``/etc/hosts`` is read at each lookup). Name lookups on a host use
    ``/etc/hosts`` only (its ``nsswitch.conf`` says ``hosts: files``, its resolver is its
    own loopback), so a name left out fails at once, like a name DNS does not know yet.

    ``bridge_address``: give the bridge the subnet's ``.254``, so that processes of the
    root namespace (the test itself) reach the hosts, and the root namespace routes the
    subnet to the bridge rather than to its default route.
    """

    def __init__(
        self,
        n: int | None = None,
        *,
        names: Sequence[str] | None = None,
        bridge_address: bool = True,
    ) -> None:
        if names is None:
            names = [f"host{i}" for i in range(2 if n is None else n)]
        names = list(names)
        if n is not None and n != len(names):
            raise ValueError(f"{n} hosts but {len(names)} names: {names}")
        if not 1 <= len(names) <= _MAX_HOSTS:
            raise ValueError(f"a cluster has 1 to {_MAX_HOSTS} hosts, not {len(names)}")
        for name in names:
            if not _HOSTNAME.match(name) or name.lower().startswith("localhost"):
                raise ValueError(f"not a usable hostname: {name!r}")
        if len({name.lower() for name in names}) != len(names):
            raise ValueError(f"host names are not unique: {names}")
        self._names = names
        self._bridge_address = bridge_address
        self.tag = ""
        """``PREFIX`` + creator pid + random: the start of all the cluster's names."""
        self.bridge = ""
        """The bridge's interface name (in the root namespace)."""
        self.subnet: ipaddress.IPv4Network | None = None
        self.bridge_address: str | None = None
        """The root namespace's address on the bridge, when ``bridge_address`` was set."""
        self.hosts: list[Host] = []
        self._entries: dict[str, dict[str, str]] = {}
        self._started: list[subprocess.Popen[Any]] = []
        self._frozen: set[int] = set()
        self._delayed: set[str] = set()
        self._netem_probed = False
        self._netem_missing: str | None = None
        self._state: Path | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Cluster:
        """Sweep dead runs' leftovers, then make the bridge, the hosts and their files.
        Raises :class:`NetnsUnavailable` where namespaces cannot be made; on any other
        failure removes what it made, then raises."""
        if self.tag:
            raise RuntimeError("the cluster was started already")
        reason = netns_unavailable_reason()
        if reason is not None:
            raise NetnsUnavailable(reason)
        try:
            self._reserve()
            self._build()
        except BaseException:
            with contextlib.suppress(Exception):
                self.close()
            raise
        return self

    def _reserve(self) -> None:
        """Under the kit's lock: sweep, pick a tag and a /24 no one uses, and record them
        (with every name the cluster will make) before making anything, so that a crash at
        any point leaves only what a later sweep finds."""
        with _locked() as state:
            self._state = state
            _sweep(state)
            pid = os.getpid()
            if pid > 0xFFFFFF:
                raise NetnsError(f"pid {pid} does not fit the kit's names")
            existing = set(os.listdir("/sys/class/net"))
            with contextlib.suppress(OSError):
                existing |= set(os.listdir(NETNS_RUN))
            while True:
                tag = f"{PREFIX}{pid:06x}{secrets.randbelow(0x1000):03x}"
                if not (state / f"{tag}.json").exists() and not any(
                    name.startswith(tag) for name in existing
                ):
                    break
            taken = _taken_networks(state)
            candidates = list(SUBNETS.subnets(new_prefix=24))
            secrets.SystemRandom().shuffle(candidates)
            subnet = next(
                (net for net in candidates if not any(net.overlaps(t) for t in taken)), None
            )
            if subnet is None:
                raise NetnsError(f"no free /24 left in {SUBNETS}")
            addresses = list(subnet.hosts())
            self.tag, self.subnet, self.bridge = tag, subnet, f"{tag}br"
            if self._bridge_address:
                self.bridge_address = str(addresses[-1])
            self.hosts = [
                Host(self, i, name, f"{tag}-{name}", str(addresses[i]), f"{tag}v{i:02d}")
                for i, name in enumerate(self._names)
            ]
            record = {
                "tag": tag,
                "pid": pid,
                "create_time": psutil.Process(pid).create_time(),
                "subnet": str(subnet),
                "bridge": self.bridge,
                "hosts": {h.name: [h.namespace, h.address, h.veth] for h in self.hosts},
            }
            (state / f"{tag}.json").write_text(json.dumps(record, indent=1))
            # Under the lock, since a closing cluster removes /etc/netns once it is empty.
            NETNS_ETC.mkdir(mode=0o755, exist_ok=True)
            for host in self.hosts:
                (NETNS_ETC / host.namespace).mkdir(mode=0o755)

    def _build(self) -> None:
        assert self.subnet is not None
        prefixlen = self.subnet.prefixlen
        # STP off (the default) puts a port straight into forwarding, also after restore().
        _cmd(["ip", "link", "add", self.bridge, "type", "bridge", "stp_state", "0"])
        if self.bridge_address:
            _cmd(["ip", "addr", "add", f"{self.bridge_address}/{prefixlen}", "dev", self.bridge])
        _cmd(["ip", "link", "set", self.bridge, "up"])
        for host in self.hosts:
            self._entries[host.name] = {h.name: h.address for h in self.hosts}
            etc = NETNS_ETC / host.namespace
            self._write_hosts(host)
            # Name lookups on the host never leave it: /etc/hosts only, and any resolver
            # that reads resolv.conf itself asks the host's own loopback.
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
            (etc / "nsswitch.conf").write_text(_nsswitch_files_only())
            ns = host.namespace
            _cmd(["ip", "netns", "add", ns])
            _cmd(
                [
                    "ip",
                    "link",
                    "add",
                    host.veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    _INNER_DEV,
                    "netns",
                    ns,
                ]
            )
            _cmd(["ip", "link", "set", host.veth, "master", self.bridge, "up"])
            _cmd(["ip", "-n", ns, "addr", "add", f"{host.address}/{prefixlen}", "dev", _INNER_DEV])
            _cmd(["ip", "-n", ns, "link", "set", _INNER_DEV, "up"])
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])

    def close(self) -> None:
        """Kill every process the cluster started and every process inside its
        namespaces, then remove the namespaces, links, ``/etc/netns`` directories and the
        registry entry. Idempotent. Raises :class:`NetnsError` if something survived."""
        if self._closed or not self.tag:
            self._closed = True
            return
        self._closed = True
        problems: list[str] = []
        for pid in sorted(self._frozen):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)
        self._frozen.clear()
        procs: dict[int, psutil.Process] = {}
        own_group = os.getpgrp()
        for popen in self._started:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(popen.pid)
                for proc in [root, *root.children(recursive=True)]:
                    procs[proc.pid] = proc
            # Its process group too: members that a dead parent left to init.
            with contextlib.suppress(OSError):
                group = os.getpgid(popen.pid)
                if group != own_group:
                    os.killpg(group, signal.SIGKILL)
        for host in self.hosts:
            for proc in host.processes():
                procs[proc.pid] = proc
        survivors = _kill(list(procs.values()))
        problems += [f"process {p.pid} survived SIGKILL" for p in survivors]
        for popen in self._started:
            try:
                popen.communicate(timeout=5)  # reaps it and closes its pipes
            except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
                problems.append(f"process {popen.pid}: {exc!r}")
        for host in self.hosts:
            _cmd(["ip", "link", "del", host.veth], check=False)
            _cmd(["ip", "netns", "del", host.namespace], check=False)
            shutil.rmtree(NETNS_ETC / host.namespace, ignore_errors=True)
        _cmd(["ip", "link", "del", self.bridge], check=False)
        problems += [f"left behind: {item}" for item in self.leftovers()]
        with _locked() as state:
            with contextlib.suppress(OSError):
                (state / f"{self.tag}.json").unlink()
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # only when empty: other clusters may use it
        if problems:
            raise NetnsError(f"cluster {self.tag} teardown: " + "; ".join(problems))

    def leftovers(self) -> list[str]:
        """What of this cluster still exists: namespaces, links, ``/etc/netns`` dirs."""
        if not self.tag:
            return []
        left = []
        with contextlib.suppress(OSError):
            left += [f"netns {n}" for n in os.listdir(NETNS_RUN) if n.startswith(self.tag)]
        left += [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(self.tag)]
        with contextlib.suppress(OSError):
            left += [
                f"dir {NETNS_ETC / n}" for n in os.listdir(NETNS_ETC) if n.startswith(self.tag)
            ]
        return left

    # -- hosts -----------------------------------------------------------------------------

    def host(self, ref: HostRef) -> Host:
        """The host ``ref`` names (a :class:`Host` of this cluster, a name or an index)."""
        if isinstance(ref, Host):
            if ref.cluster is not self:
                raise ValueError(f"{ref.name} is a host of another cluster")
            return ref
        if isinstance(ref, int):
            return self.hosts[ref]
        for host in self.hosts:
            if host.name == ref:
                return host
        raise KeyError(f"no host {ref!r} in {[h.name for h in self.hosts]}")

    __getitem__ = host

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def processes(self) -> list[psutil.Process]:
        """Every live process on any host of the cluster."""
        return [proc for host in self.hosts for proc in host.processes()]

    # -- names -----------------------------------------------------------------------------

    def hosts_entries(self, host: HostRef) -> dict[str, str]:
        """``{name: address}`` of ``host``'s ``/etc/hosts`` (besides ``localhost``)."""
        return dict(self._entries[self.host(host).name])

    def set_hosts_entry(self, host: HostRef, name: str, address: str | None) -> None:
        """Map ``name`` to ``address`` in ``host``'s ``/etc/hosts``, or, with None, leave
        ``name`` out (lookups of it on that host then fail). Running processes see the
        change at their next lookup. E.g. Debian's ``127.0.1.1 <hostname>`` line is
        ``cluster.set_hosts_entry("host0", "host0", "127.0.1.1")``; a name that resolves
        only later is ``set_hosts_entry(h, "host0", None)`` now and the address later."""
        target = self.host(host)
        if not _HOSTNAME.match(name) or name.lower().startswith(("localhost", "ip6-")):
            raise ValueError(f"not a name to set in /etc/hosts: {name!r}")
        entries = self._entries[target.name]
        if address is None:
            entries.pop(name, None)
        else:
            entries[name] = str(ipaddress.ip_address(address))
        self._write_hosts(target)

    def _write_hosts(self, host: Host) -> None:
        lines = [
            f"# /etc/hosts of {host.name} ({host.namespace}), written by {__name__}",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            *(f"{addr}\t{name}" for name, addr in self._entries[host.name].items()),
        ]
        data = ("\n".join(lines) + "\n").encode()
        # Processes on the host see this very inode (ip netns exec bind-mounted it), so it
        # is rewritten in place, never replaced. One write at offset 0, never a truncation:
        # a concurrent lookup must not find the file empty. A shorter content is padded
        # with a comment line to the old size.
        fd = os.open(host.hosts_file, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            missing = os.fstat(fd).st_size - len(data)
            if missing >= 2:
                data += b"#" + b" " * (missing - 2) + b"\n"
            elif missing == 1:
                data += b"\n"
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    # -- faults ----------------------------------------------------------------------------

    def cut(self, host: HostRef) -> None:
        """Cut ``host``'s link: its veth end on the bridge goes down, so nothing passes
        either way (the host's own end loses its carrier but keeps its address and route,
        as after a cable cut: connections stall and connects time out)."""
        _cmd(["ip", "link", "set", self.host(host).veth, "down"])

    def restore(self, host: HostRef) -> None:
        """Undo :meth:`cut`: the link comes up and forwards again (returns when it does)."""
        target = self.host(host)
        _cmd(["ip", "link", "set", target.veth, "up"])
        operstate = Path("/sys/class/net") / target.veth / "operstate"
        deadline = time.monotonic() + 5
        while operstate.read_text().strip() != "up":
            if time.monotonic() > deadline:
                raise NetnsError(f"{target.veth} did not come up: {operstate.read_text()}")
            time.sleep(0.01)

    def netem_unavailable_reason(self) -> str | None:
        """Why :meth:`delay` cannot work here (no ``tc``, no netem in the kernel), or
        None. Probed once per cluster, on its bridge."""
        if not self._netem_probed:
            if not self.bridge:
                raise RuntimeError("the cluster is not started")
            if shutil.which("tc") is None:
                self._netem_missing = "`tc` not found (install iproute2)"
            else:
                argv = ["tc", "qdisc", "add", "dev", self.bridge, "root", "netem", "delay", "0ms"]
                done = _cmd(argv, check=False)
                if done.returncode == 0:
                    _cmd(["tc", "qdisc", "del", "dev", self.bridge, "root"], check=False)
                    self._netem_missing = None
                else:
                    self._netem_missing = (
                        f"`{shlex.join(argv)}` failed: {done.stderr.strip()} "
                        "(the kernel has no sch_netem, or tc lacks netem)"
                    )
            self._netem_probed = True
        return self._netem_missing

    def delay(self, host: HostRef, ms: float, loss_percent: float = 0.0) -> None:
        """Delay every packet to and from ``host`` by ``ms`` (so a round trip between it
        and another host takes ``2 * ms`` longer) and drop ``loss_percent`` % of them, each
        way. Replaces an earlier :meth:`delay`; :meth:`undelay` removes it. Raises
        :class:`NetemUnavailable` where the kernel has no netem."""
        reason = self.netem_unavailable_reason()
        if reason is not None:
            raise NetemUnavailable(reason)
        target = self.host(host)
        netem = ["netem", "delay", f"{ms:g}ms"]
        if loss_percent:
            netem += ["loss", f"{loss_percent:g}%"]
        # Both ends: a qdisc shapes only what leaves a device, and each end sees one way.
        _cmd(["tc", "qdisc", "replace", "dev", target.veth, "root", *netem])
        _cmd(["tc", "-n", target.namespace, "qdisc", "replace", "dev", _INNER_DEV, "root", *netem])
        self._delayed.add(target.name)

    def undelay(self, host: HostRef) -> None:
        """Remove :meth:`delay`'s delay and loss from ``host``."""
        target = self.host(host)
        if target.name in self._delayed:
            _cmd(["tc", "qdisc", "del", "dev", target.veth, "root"], check=False)
            _cmd(
                ["tc", "-n", target.namespace, "qdisc", "del", "dev", _INNER_DEV, "root"],
                check=False,
            )
            self._delayed.discard(target.name)

    def freeze(
        self, target: int | subprocess.Popen[Any] | psutil.Process, *, tree: bool = False
    ) -> list[int]:
        """SIGSTOP a process (e.g. an agent: its workers go on), or with ``tree`` it and
        all its descendants; returns when they are stopped, with their pids. Frozen
        processes are thawed (and killed) when the cluster closes."""
        procs = _targets(target, tree)
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
            self._frozen.add(proc.pid)
        _wait_status(procs, stopped=True)
        return [proc.pid for proc in procs]

    def thaw(
        self, target: int | subprocess.Popen[Any] | psutil.Process, *, tree: bool = False
    ) -> list[int]:
        """SIGCONT what :meth:`freeze` stopped; returns when it runs again, with the pids."""
        procs = _targets(target, tree)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
            self._frozen.discard(proc.pid)
        _wait_status(procs, stopped=False)
        return [proc.pid for proc in procs]


def _targets(
    target: int | subprocess.Popen[Any] | psutil.Process, tree: bool
) -> list[psutil.Process]:
    if isinstance(target, psutil.Process):
        proc = target
    else:
        proc = psutil.Process(target if isinstance(target, int) else target.pid)
    return [proc, *proc.children(recursive=True)] if tree else [proc]


def _wait_status(procs: Sequence[psutil.Process], *, stopped: bool, timeout: float = 5.0) -> None:
    """Signals are delivered asynchronously: wait until each process shows the state."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        while True:
            try:
                status = proc.status()
            except psutil.NoSuchProcess:
                break
            if (status == psutil.STATUS_STOPPED) == stopped or status == psutil.STATUS_ZOMBIE:
                break
            if time.monotonic() > deadline:
                raise NetnsError(
                    f"process {proc.pid} is {status}, not {'stopped' * stopped or 'running'}"
                )
            time.sleep(0.005)


def _nsswitch_files_only() -> str:
    """The machine's ``nsswitch.conf`` with ``hosts: files``: a host resolves names by
    its ``/etc/hosts`` only (no DNS, no nss-myhostname answering for its own name)."""
    try:
        lines = Path("/etc/nsswitch.conf").read_text().splitlines()
    except OSError:
        lines = ["passwd: files", "group: files", "shadow: files"]
    lines = [line for line in lines if line.split(":", 1)[0].strip() != "hosts"]
    return "\n".join([*lines, "hosts: files"]) + "\n"
