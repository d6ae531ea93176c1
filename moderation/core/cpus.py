"""How many CPUs this process may use: its affinity mask and its cgroup's CPU quota.

`os.cpu_count()` is the host's cores: a pod limited to 2 CPUs on a 128-core node that starts
128 torch threads spends its quota in a fraction of each period and is then throttled for the
rest (the issue measured 31 s for what one thread did in 6.3 s). The quota is what counts: a
cgroup v2 `cpu.max` ("200000 100000": 2 CPUs; "max 100000": none) on the process's cgroup or
any parent, or cgroup v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none) likewise.
A fractional quota rounds down (1.5 CPUs: 1 thread, never throttled), never below 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _v2_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The smallest `cpu.max` quota from the process's cgroup up to the root, in CPUs."""
    own = "/"
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            own = line[3:] or "/"
    quotas = []
    folder = root / own.lstrip("/")
    while True:
        text = _read(folder / "cpu.max")
        if text is not None:
            parts = text.split()
            if len(parts) == 2 and parts[0] != "max":
                try:
                    quota, period = int(parts[0]), int(parts[1])
                except ValueError:
                    quota = period = 0
                if quota > 0 and period > 0:
                    quotas.append(quota / period)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(quotas) if quotas else None


def _v1_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The smallest cfs quota from the process's cpu cgroup up to the hierarchy's root."""
    own = "/"
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "cpu" in parts[1].split(","):
            own = parts[2] or "/"
    quotas = []
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        top = root / name
        if not top.is_dir():
            continue
        folder = top / own.lstrip("/")
        while True:
            quota = _read(folder / "cpu.cfs_quota_us")
            period = _read(folder / "cpu.cfs_period_us")
            try:
                q, p = int(quota or "-1"), int(period or "0")
            except ValueError:
                q = p = 0
            if q > 0 and p > 0:
                quotas.append(q / p)
            if folder == top or top not in folder.parents:
                break
            folder = folder.parent
        break  # the controller's one mount (the others are links to it)
    return min(quotas) if quotas else None


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The cgroup's CPU quota in CPUs (2.0, 0.5...), None without one."""
    v2 = _v2_quota(root, proc_cgroup)
    return v2 if v2 is not None else _v1_quota(root, proc_cgroup)


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may keep busy: its affinity mask (taskset, cpusets) capped by its
    cgroup's quota, rounded down, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.floor(quota))
    return max(1, cpus)
