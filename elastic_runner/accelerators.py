"""How many GPUs this process may use, counted without torch: the number behind
``job.nproc_per_node=gpu`` and ``auto``.

torchrun asks torch (``torch.cuda.device_count()``, ``torch.accelerator``). elastic-run
does not depend on torch, so it reads what the drivers publish, then narrows the count
with the visibility variables the way the CUDA and HIP runtimes read them:

- NVIDIA: one directory per GPU in ``/proc/driver/nvidia/gpus`` (the kernel module's list,
  which the NVIDIA container runtime trims to the container's GPUs), else the
  ``/dev/nvidia<N>`` device nodes, else ``nvidia-smi -L`` (WSL 2 has neither; nor has a
  host whose module nvidia-smi has yet to load). ``NVIDIA_VISIBLE_DEVICES`` (what
  container runtimes set) and then ``CUDA_VISIBLE_DEVICES`` narrow the count.
- AMD (ROCm): the GPU nodes (``simd_count`` > 0; CPUs are nodes too) of the KFD topology
  in ``/sys/class/kfd/kfd/topology/nodes``, else ``/dev/dri/renderD<N>`` when ``/dev/kfd``
  exists (ROCm computes through ``/dev/kfd``; a render node alone may be any vendor's
  GPU). ``ROCR_VISIBLE_DEVICES`` and then ``HIP_VISIBLE_DEVICES`` (else
  ``CUDA_VISIBLE_DEVICES``, which HIP also reads) narrow the count.
- Slurm: in a job (``SLURM_JOB_ID`` set), the GPUs Slurm gave it on this node
  (``SLURM_GPUS_ON_NODE``, else the ``SLURM_STEP_GPUS`` or ``SLURM_JOB_GPUS`` list) cap
  the count, whichever vendor's; Slurm also sets ``CUDA_VISIBLE_DEVICES`` (or its kin),
  read as above.

A machine with both kinds counts its NVIDIA GPUs: a torch build uses one kind. Nothing is
cached: each call looks again (one run calls it once).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "DEVICE_ROOT_ENV",
    "NVIDIA_SMI_TIMEOUT",
    "GpuCount",
    "Runner",
    "cuda_visible_count",
    "detect_gpus",
]

#: For tests only: a directory that stands for ``/`` (its ``proc/``, ``dev/`` and ``sys/``
#: are searched instead) when :func:`detect_gpus` is given no root; no command is run then,
#: so that the fake tree is all that is seen.
DEVICE_ROOT_ENV = "ELASTIC_RUNNER_DEVICE_ROOT"
#: Seconds ``nvidia-smi -L`` may take: a wedged driver can hang it for minutes.
NVIDIA_SMI_TIMEOUT = 5.0

#: Runs a command, as :func:`subprocess.run` (the default) does.
Runner = Callable[..., "subprocess.CompletedProcess[str]"]

_NVIDIA_NODE = re.compile(r"nvidia[0-9]+")
_RENDER_NODE = re.compile(r"renderD[0-9]+")
_PROC_UUID = re.compile(r"^GPU UUID:\s*(GPU-\S+)", re.MULTILINE)
_SMI_GPU = re.compile(r"^GPU [0-9]+:.*?(?:\(UUID: (GPU-[^)\s]+)\))?\s*$", re.MULTILINE)
_SIMD_COUNT = re.compile(r"^simd_count\s+([0-9]+)", re.MULTILINE)
#: A list item as CUDA reads it (like ``strtoul``): a number, then anything (``1gpu`` is 1).
_ORDINAL = re.compile(r"([+-]?)([0-9]+)")


class _Found(NamedTuple):
    """Devices of one vendor: how many, where they were seen, their UUIDs if known."""

    devices: int
    source: str
    uuids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class GpuCount:
    """The GPUs this process may use, and how that was found (for a log line or an
    error message)."""

    #: GPUs this process may use: ``min(found, allowed by the visibility variables)``.
    visible: int
    #: GPUs found, before the visibility variables.
    found: int
    #: ``NVIDIA`` or ``AMD``; empty when none was found.
    vendor: str
    #: Where they were found: a path or a command; empty when none was found.
    source: str
    #: The visibility variables that applied, as ``NAME='value'``.
    narrowed_by: tuple[str, ...]
    #: Every place looked in, in order (a command's failure noted).
    looked_in: tuple[str, ...]

    def describe(self) -> str:
        """``8 NVIDIA GPUs (/proc/driver/nvidia/gpus)``, ``2 NVIDIA GPUs (8 found in ...;
        CUDA_VISIBLE_DEVICES='0,1')``, ``no NVIDIA GPU visible (...)`` or ``no GPU found
        (looked in ...)``."""
        if not self.found:
            return f"no GPU found (looked in {', '.join(self.looked_in)})"
        if self.visible == self.found:
            return f"{_gpus(self.visible, self.vendor)} ({self.source})"
        why = f"{self.found} found in {self.source}; {'; '.join(self.narrowed_by)}"
        if not self.visible:
            return f"no {self.vendor} GPU visible ({why})"
        return f"{_gpus(self.visible, self.vendor)} ({why})"


def _gpus(n: int, vendor: str) -> str:
    return f"{n} {vendor} GPU{'' if n == 1 else 's'}"


def detect_gpus(
    root: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    run: Runner | None = subprocess.run,
    timeout: float = NVIDIA_SMI_TIMEOUT,
) -> GpuCount:
    """Count the GPUs this process may use (see the module's docstring for where).

    ``root`` stands for ``/`` (default: ``$ELASTIC_RUNNER_DEVICE_ROOT``, for tests, which
    also turns commands off; else ``/``); ``environ`` holds the visibility variables and is
    the commands' environment (default :data:`os.environ`); ``run`` runs ``nvidia-smi``
    (``None``: run nothing), which may take ``timeout`` seconds. Never raises for what it
    finds: an unreadable place or a failed command is one less place that answered."""
    env = os.environ if environ is None else environ
    if root is None:
        fake = env.get(DEVICE_ROOT_ENV)
        root, run = (fake, None) if fake else ("/", run)
    base = Path(root)
    looked: list[str] = []
    nvidia = _find_nvidia(base, env, run, timeout, looked)
    if nvidia.devices:
        allowed, narrowed = _slurm_allowed(*_nvidia_allowed(nvidia, env), env)
        return GpuCount(allowed, nvidia.devices, "NVIDIA", nvidia.source, narrowed, tuple(looked))
    amd = _find_amd(base, looked)
    if amd.devices:
        allowed, narrowed = _slurm_allowed(*_amd_allowed(amd.devices, env), env)
        return GpuCount(allowed, amd.devices, "AMD", amd.source, narrowed, tuple(looked))
    return GpuCount(0, 0, "", "", (), tuple(looked))


def cuda_visible_count(value: str | None, found: int, uuids: Sequence[str] | None = None) -> int:
    """How many of ``found`` devices a ``CUDA_VISIBLE_DEVICES``-style list lets through,
    read as the CUDA runtime does (and torch's ``_parse_visible_devices`` mirrors):

    - unset (``None``): all of them;
    - ordinals, each read like ``strtoul`` (``1gpu`` is 1): items count in order up to
      the first that is not a number or is negative (so ``''``, ``-1`` and Slurm's
      ``NoDevFiles`` allow none), then up to the first that is not below ``found``; an
      ordinal listed twice allows none;
    - ``GPU-<uuid>`` or ``MIG-<uuid>`` ids: items count up to the first without the
      first item's prefix; an id listed twice allows none; with the devices' ``uuids``
      known, each GPU id must be a prefix of exactly one of them (up to the first that
      is not).

    Never raises; the result is within ``0..found``."""
    if value is None:
        return found
    value = value.strip()
    if value.startswith(("GPU-", "MIG-")):
        return min(_count_ids(value, value[:4], uuids), found)
    ordinals: list[int] = []
    for item in value.split(","):
        m = _ORDINAL.match(item.strip())
        if m is None:
            break
        sign, digits = m.group(1), m.group(2).lstrip("0") or "0"
        if sign == "-" and digits != "0":  # a negative ordinal ends the list
            break
        # int() of thousands of digits raises; past 18 digits it is out of range anyway
        ordinal = int(digits) if len(digits) <= 18 else found
        if ordinal in ordinals:
            return 0
        ordinals.append(ordinal)
    # only now: CUDA drops a repeated ordinal even after one that is out of range
    return next((i for i, n in enumerate(ordinals) if n >= found), len(ordinals))


def _count_ids(value: str, prefix: str, uuids: Sequence[str] | None) -> int:
    ids: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if item in ids:
            return 0
        if not item.startswith(prefix):
            break
        ids.append(item)
    # MIG instances are not among the GPUs' UUIDs: they are counted as listed
    if uuids is None or prefix == "MIG-":
        return len(ids)
    matched: list[int] = []
    for item in ids:
        candidates = [i for i, uuid in enumerate(uuids) if uuid.startswith(item)]
        if len(candidates) != 1:  # unknown, or a prefix of several: the list ends here
            break
        if candidates[0] in matched:
            return 0
        matched.append(candidates[0])
    return len(matched)


def _find_nvidia(
    base: Path, env: Mapping[str, str], run: Runner | None, timeout: float, looked: list[str]
) -> _Found:
    gpus = base / "proc/driver/nvidia/gpus"
    looked.append(str(gpus))
    try:
        with os.scandir(gpus) as entries:
            dirs = [Path(e.path) for e in entries if e.is_dir()]
    except OSError:
        dirs = None  # no NVIDIA module loaded (or /proc hides it)
    if dirs:
        return _Found(len(dirs), str(gpus), _proc_uuids(dirs, env))
    dev = base / "dev"
    looked.append(f"{dev}/nvidia<N>")
    nodes = _matching(dev, _NVIDIA_NODE)
    if nodes:
        return _Found(nodes, f"{dev}/nvidia<N>")
    if dirs is not None or run is None:  # the loaded module lists none: it has none
        return _Found(0, "")
    return _nvidia_smi(run, env, timeout, looked)


def _proc_uuids(dirs: list[Path], env: Mapping[str, str]) -> tuple[str, ...] | None:
    """The GPUs' UUIDs from their ``information`` files, read only when
    ``CUDA_VISIBLE_DEVICES`` names GPUs by UUID; ``None`` unless every one is known."""
    if not env.get("CUDA_VISIBLE_DEVICES", "").strip().startswith("GPU-"):
        return None
    uuids = []
    for gpu in dirs:
        try:
            m = _PROC_UUID.search((gpu / "information").read_text(errors="replace"))
        except OSError:
            return None
        if m is None:
            return None
        uuids.append(m.group(1))
    return tuple(uuids)


def _nvidia_smi(run: Runner, env: Mapping[str, str], timeout: float, looked: list[str]) -> _Found:
    failure: str | None = None
    try:
        done = run(
            ["nvidia-smi", "-L"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        failure = "not installed"
    except subprocess.TimeoutExpired:  # a wedged driver can hang it for minutes
        failure = f"no answer in {timeout:g} s"
    except (OSError, ValueError) as exc:  # not executable; a NUL in the environment
        failure = str(exc)
    else:
        failure = f"exit {done.returncode}" if done.returncode else None
    looked.append(f"nvidia-smi -L ({failure})" if failure else "nvidia-smi -L")
    if failure:
        return _Found(0, "")
    gpus = _SMI_GPU.findall(done.stdout or "")
    uuids = tuple(gpus) if gpus and all(gpus) else None
    return _Found(len(gpus), "nvidia-smi -L", uuids)


def _nvidia_allowed(nvidia: _Found, env: Mapping[str, str]) -> tuple[int, tuple[str, ...]]:
    """``NVIDIA_VISIBLE_DEVICES`` (the container's GPUs, numbered from 0 inside it), then
    ``CUDA_VISIBLE_DEVICES`` among those."""
    count, narrowed = nvidia.devices, []
    container = env.get("NVIDIA_VISIBLE_DEVICES")
    if container is not None:
        narrowed.append(f"NVIDIA_VISIBLE_DEVICES={container!r}")
        word = container.strip().lower()
        if word in ("", "none", "void"):  # void and empty: no GPU; none: the driver only
            count = 0
        elif word != "all":
            count = min(count, len({i.strip() for i in container.split(",") if i.strip()}))
    cuda = env.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None:
        narrowed.append(f"CUDA_VISIBLE_DEVICES={cuda!r}")
        # UUIDs identify the found GPUs only when the container variable kept them all
        uuids = nvidia.uuids if count == nvidia.devices else None
        count = cuda_visible_count(cuda, count, uuids)
    return count, tuple(narrowed)


def _find_amd(base: Path, looked: list[str]) -> _Found:
    nodes = base / "sys/class/kfd/kfd/topology/nodes"
    looked.append(str(nodes))
    count = 0
    try:
        names = os.listdir(nodes)
    except OSError:
        names = []
    for name in names:
        try:
            m = _SIMD_COUNT.search((nodes / name / "properties").read_text(errors="replace"))
        except OSError:
            continue
        count += bool(m and int(m.group(1)) > 0)  # CPU nodes have no SIMD units
    if count:
        return _Found(count, str(nodes))
    dri = base / "dev/dri"
    looked.append(f"{dri}/renderD<N> with {base / 'dev/kfd'}")
    if not (base / "dev/kfd").exists():
        return _Found(0, "")
    renders = _matching(dri, _RENDER_NODE)
    return _Found(renders, f"{dri}/renderD<N>")


def _amd_allowed(found: int, env: Mapping[str, str]) -> tuple[int, tuple[str, ...]]:
    """``ROCR_VISIBLE_DEVICES`` first (the ROCm runtime hides the rest from HIP), then
    ``HIP_VISIBLE_DEVICES``, else ``CUDA_VISIBLE_DEVICES``, among those."""
    count, narrowed = found, []
    for names in (("ROCR_VISIBLE_DEVICES",), ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")):
        name = next((n for n in names if n in env), None)
        if name is not None:
            narrowed.append(f"{name}={env[name]!r}")
            count = cuda_visible_count(env[name], count)
    return count, tuple(narrowed)


def _slurm_allowed(
    count: int, narrowed: tuple[str, ...], env: Mapping[str, str]
) -> tuple[int, tuple[str, ...]]:
    """In a Slurm job (``SLURM_JOB_ID`` set), at most the GPUs Slurm gave it on this node:
    ``SLURM_GPUS_ON_NODE``, else as many as ``SLURM_STEP_GPUS`` (else ``SLURM_JOB_GPUS``)
    lists. An upper bound on what the visibility variables (which Slurm sets too) allow;
    without any of these, Slurm says nothing and the count stands."""
    if "SLURM_JOB_ID" not in env:
        return count, narrowed
    on_node = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return min(count, int(on_node)), (*narrowed, f"SLURM_GPUS_ON_NODE={on_node!r}")
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        listed = env.get(name, "").strip()
        if listed:
            n = len({item.strip() for item in listed.split(",") if item.strip()})
            return min(count, n), (*narrowed, f"{name}={listed!r}")
    return count, narrowed


def _matching(directory: Path, pattern: re.Pattern[str]) -> int:
    """How many names in ``directory`` match ``pattern`` whole (0 if unreadable)."""
    try:
        return sum(1 for name in os.listdir(directory) if pattern.fullmatch(name))
    except OSError:
        return 0
