"""How many CPU threads dsdkit computes with, and how its thread pools wait (torch-free).

Thread pools that spin while they wait for work are a little faster on an otherwise idle machine and much slower
on a shared one, because a spinning thread holds on to a core that the thread with real work, or the other
process, needs. On two cores, beside one busy-looping process pinned to one of them, spinning made the scoring of
``dsdkit match`` on the tiny model 1.5-1.6x slower and passive waiting left it unchanged; beside other jobs' torch
processes, spinning runs took 3-7x as long (``benchmarks/thread_contention.py``; a quiet machine pays about 10% for
passive waiting). So dsdkit waits passively by default and computes with no more threads than it may really use:
the smaller of its CPU affinity and its cgroup CPU quota.

Two runtimes are concerned:

* **torch** (libgomp OpenMP; MKL and oneDNN run on the same OpenMP threads). The wait policy is read from the
  environment once, when libgomp loads with torch, so ``OMP_WAIT_POLICY=PASSIVE`` must be in ``os.environ``
  before the first ``import torch``; with it libgomp's spin count is 0 (``GOMP_SPINCOUNT`` needs no value of its
  own). The thread count can change later with ``torch.set_num_threads``.
* **ONNX Runtime** (its own thread pools): :func:`ort_session_options` turns spinning off in the session options
  and sets the intra-op thread count.

``import dsdkit`` calls :func:`use_passive_waiting` (before anything can import torch through dsdkit), so a program
that imports dsdkit before torch waits passively as the CLI does; one that imported torch first gets one logged hint.
The CLI also calls :func:`configure_threads` at the top of every command that computes; a library user calls it as
``dsdkit.configure_threads(n)`` (before importing torch, the thread count reaches torch's OpenMP pool as it starts;
after, through ``torch.set_num_threads``), or exports ``OMP_WAIT_POLICY=PASSIVE`` and ``OMP_NUM_THREADS=N`` in the
shell.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

from .errors import ConfigError

__all__ = [
    "default_threads",
    "cgroup_cpu_limit",
    "configure_threads",
    "use_passive_waiting",
    "current_threads",
    "ort_session_options",
]

logger = logging.getLogger(__name__)

# Where the kernel shows this process's cgroups; module attributes so tests can point them at fake trees.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")

# The count :func:`configure_threads` chose, for runtimes created after it (ONNX Runtime sessions).
_configured: int | None = None
# Whether the torch-came-first hint of :func:`use_passive_waiting` was given (it is given once per process).
_hinted = False


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: no affinity masks to respect
        return os.cpu_count() or 1


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(root: Path, relative: str) -> list[Path]:
    """``root/relative`` and each of its parents up to ``root``: a quota set on any ancestor limits us too."""
    parts = [p for p in relative.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")  # "QUOTA PERIOD", QUOTA "max" when unlimited
    if not text:
        return None
    fields = text.split()
    try:
        if fields[0] == "max":
            return None
        return int(fields[0]) / int(fields[1]) if len(fields) > 1 and int(fields[1]) > 0 else None
    except ValueError:
        return None


def _v1_limit(folder: Path) -> float | None:
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None  # quota -1: unlimited


def cgroup_cpu_limit() -> float | None:
    """The CPUs this process's cgroup may use per period (``1.5`` = one and a half cores); ``None`` when unlimited.

    cgroup v2 reads ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, in the process's own cgroup
    (from ``/proc/self/cgroup``) and each ancestor; the smallest limit wins. Inside a container the own cgroup is
    usually shown as ``/``, so the container's limit is read at the root.
    """
    lines = (_read(PROC_CGROUP) or "").splitlines()
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            folders = _ancestors(CGROUP_ROOT, relative)
            limits += [limit for folder in folders if (limit := _v2_limit(folder)) is not None]
        elif "cpu" in controllers.split(","):
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                folders = _ancestors(CGROUP_ROOT / mount, relative)
                limits += [limit for folder in folders if (limit := _v1_limit(folder)) is not None]
    if not lines:  # no /proc/self/cgroup (an unusual kernel): the root's own files, if any
        limits += [x for x in (_v2_limit(CGROUP_ROOT), _v1_limit(CGROUP_ROOT / "cpu")) if x is not None]
    return min(limits) if limits else None


def default_threads() -> int:
    """The smaller of the CPUs in this process's affinity mask and its cgroup CPU quota (rounded up), at least 1.

    ``os.cpu_count()`` counts the machine's CPUs, not the ones this process may run on: a container limited to two
    cores on a 64-core host would otherwise start 64 threads fighting over two cores.
    """
    count = _affinity()
    quota = cgroup_cpu_limit()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP allows a per-level list "4,2"
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def use_passive_waiting(hint: bool = False) -> bool:
    """Make OpenMP threads sleep instead of spinning while they wait, unless the user chose a wait policy.

    Only takes effect before torch is imported (libgomp reads the policy once, when it loads); returns whether it
    still could. ``setdefault``: a user's explicit ``OMP_WAIT_POLICY=ACTIVE`` (a dedicated machine) is respected.

    ``import dsdkit`` calls it with ``hint=True``: when torch was imported first and no policy is set, one warning
    (once per process, on the ``dsdkit`` logger) says how to get passive waiting; otherwise a debug line.
    """
    global _hinted
    if "torch" in sys.modules:
        if "OMP_WAIT_POLICY" not in os.environ and hint and not _hinted:
            _hinted = True
            logging.getLogger("dsdkit").warning(
                "torch was imported before dsdkit, so its OpenMP threads spin while they wait; beside other busy "
                "processes that can make scoring several times slower. Import dsdkit before torch, or set "
                "OMP_WAIT_POLICY=PASSIVE in the environment (ACTIVE keeps spinning and silences this)"
            )
        elif os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE":
            logger.debug(
                "torch is already imported: its OpenMP wait policy (%s) cannot change any more; set "
                "OMP_WAIT_POLICY=PASSIVE before importing torch",
                os.environ.get("OMP_WAIT_POLICY", "unset: libgomp spins a while"),
            )
        return False
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return True


def configure_threads(threads: int | None = None, passive: bool = True) -> int:
    """Compute with ``threads`` CPU threads (default: ``OMP_NUM_THREADS`` if set, else :func:`default_threads`);
    returns the count.

    Before torch is imported this sets ``OMP_NUM_THREADS`` (and, with ``passive``, ``OMP_WAIT_POLICY=PASSIVE``
    unless the user set a policy), which torch reads when it loads; once torch is imported it calls
    ``torch.set_num_threads`` too. ONNX Runtime sessions made afterwards use the count (:func:`current_threads`).
    An explicit ``threads`` overrides ``OMP_NUM_THREADS``; a count below 1 is a :class:`ConfigError`.
    """
    global _configured
    if threads is not None and int(threads) < 1:
        raise ConfigError(f"`threads` must be >= 1, got {threads}", field="threads")
    count = int(threads) if threads is not None else (_env_threads() or default_threads())
    if passive:
        use_passive_waiting()
    os.environ["OMP_NUM_THREADS"] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(count)
        try:
            # dsdkit runs no inter-op parallel work (no torch.jit.fork); one thread there is one less to schedule.
            torch.set_num_interop_threads(1)
        except RuntimeError:  # settable only before any parallel work has started: the intra-op count is what matters
            logger.debug("torch's inter-op thread count is already fixed; left as it is")
    _configured = count
    logger.debug("computing with %d CPU threads, OMP_WAIT_POLICY=%s", count, os.environ.get("OMP_WAIT_POLICY"))
    return count


def current_threads() -> int:
    """The count set by :func:`configure_threads`, else ``OMP_NUM_THREADS``, else :func:`default_threads`."""
    return _configured or _env_threads() or default_threads()


def ort_session_options(threads: int | None = None, spinning: bool = False):
    """ONNX Runtime ``SessionOptions`` for ``threads`` intra-op threads (default :func:`current_threads`) whose
    thread pools sleep instead of spinning between work items (``spinning=False``, the default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = int(threads) if threads else current_threads()
    # ORT's pools spin by default; beside other work the spinning threads steal the cores the real work needs.
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options
