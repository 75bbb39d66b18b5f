"""The network interface torch's gloo should use, when its own choice would fail.

gloo binds the address its host's name resolves to. On machines whose ``/etc/hosts`` maps
the host name to ``127.0.1.1`` (Debian's default, common on bare metal and Slurm nodes),
that is a loopback address no other machine can reach, and every collective of a job that
spans machines hangs or fails; torchrun leaves it to the user to find out and set
``GLOO_SOCKET_IFNAME``. The agent knows better: the interface that reaches the job's
master is the one the other nodes reach this one through.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from elastic_runner.addresses import address_towards, interface_of, is_loopback

__all__ = ["GLOO_IFNAME_ENV", "collective_interface_env"]

GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"


def collective_interface_env(master_addr: str, env: Mapping[str, str]) -> dict[str, str]:
    """``{"GLOO_SOCKET_IFNAME": <interface>}`` when the job spans machines (``master_addr``
    is not loopback), this host's name resolves to a loopback address or not at all
    (gloo then falls back to loopback too), and ``env`` (what the workers get from the
    agent's environment and ``job.env``) does not set it already; else ``{}``."""
    if GLOO_IFNAME_ENV in env or is_loopback(master_addr):
        return {}
    try:
        resolved = socket.gethostbyname(socket.gethostname())
    except OSError:
        resolved = None
    if resolved is not None and not is_loopback(resolved):
        return {}
    interface = interface_of(address_towards(master_addr, 9))  # no packet is sent
    return {GLOO_IFNAME_ENV: interface} if interface else {}
