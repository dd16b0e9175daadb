"""How many CPU threads torch should use while other processes share the machine.

torch runs each op on `torch.get_num_threads()` OpenMP threads that meet at a barrier after the op.
If another process takes one of the cores, one of our threads is descheduled for a whole time slice
(milliseconds) while the others spin at the barrier: on the README's 2-core machine one busy
process made 2-thread decoding 4 to 110 times slower, while 1 thread lost only about a fifth.

So the governor samples /proc/stat and /proc/self/stat (this process) about once a second, works out
how many of the CPUs this process may run on (its affinity set) *other* processes kept busy since the
last sample, and sets the thread count to the cores they leave free (at least 1, at most
`max_threads`, and at most a cgroup CPU quota, rounded up as Go's runtime does). CPUs outside the
affinity set are not counted: in a container pinned to 2 of 64 CPUs, the host's other 62 being busy
takes nothing from us. Reading the two files costs ~0.1 ms (85 us on the README's 2-core machine,
busy); `update()` is called once per step and does nothing between samples.

Linux only; elsewhere (no /proc) the thread count is left as torch set it.
"""

import math
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Optional

import torch

PROC_STAT, PROC_CGROUP, CGROUP_ROOT = "/proc/stat", "/proc/self/cgroup", "/sys/fs/cgroup"  # tests point these elsewhere


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit() -> Optional[float]:
    """CPUs' worth of time this process's cgroup may use (cgroup v2 cpu.max, e.g. "200000 100000" is
    2.0; `docker --cpus`), or None without a quota. Inside a container the cgroup is usually the
    root of its own /sys/fs/cgroup, hence the fallback to the root."""
    with suppress(OSError, ValueError):  # unreadable or malformed: no quota we know of
        with open(PROC_CGROUP) as f:
            path = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None)
        if path is None:
            return None  # cgroup v1 only: no cpu.max
        for folder in (Path(CGROUP_ROOT) / path.lstrip("/"), Path(CGROUP_ROOT)):
            if (folder / "cpu.max").exists():
                quota, period = (folder / "cpu.max").read_text().split()
                return None if quota == "max" else int(quota) / int(period)
    return None


def threads_for(cores: int, others_busy: float, max_threads: Optional[int] = None) -> int:
    """Threads for `cores` cores when other processes keep `others_busy` cores busy (a float).

    A core counts as taken once others use more than a quarter of it: a thread that loses a
    quarter of its time slices already stalls its peers at every barrier."""
    taken = max(0, int(others_busy + 0.75))  # 0.25 -> 1, 1.25 -> 2
    n = max(1, cores - taken)
    return min(n, max_threads) if max_threads else n


def _cpu_ticks(cpus: set[int]) -> tuple[int, int, int]:
    """(busy, total, CPUs counted): clock ticks since boot of the CPUs in `cpus`, from the per-CPU
    lines of /proc/stat ("cpu3 user nice system idle iowait irq softirq steal ..."); the other CPUs
    of the host are none of our business. Steal time counts as busy (another tenant)."""
    busy = total = n = 0
    with open(PROC_STAT) as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu"):
                break  # the cpu lines come first
            if name == "cpu" or int(name[3:]) not in cpus:
                continue
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, values[:8])
            b = user + nice + system + irq + softirq + steal
            busy, total, n = busy + b, total + b + idle + iowait, n + 1
    return busy, total, n


def _own_ticks() -> int:
    """Clock ticks this process has run (all its threads), user + system."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    return int(fields[11]) + int(fields[12])


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the number of cores other processes leave free."""

    def __init__(self, max_threads: Optional[int] = None, interval: float = 1.0):
        """max_threads: never more (default: torch's thread count now, so a user's own
        torch.set_num_threads(n) stays the ceiling); a cgroup quota lowers it further."""
        self.cpus = allowed_cpus()
        self.cores = len(self.cpus)
        limit = cgroup_cpu_limit()
        self.max_threads = min(max_threads or torch.get_num_threads(), math.ceil(limit or self.cores))
        self.interval = interval
        self.enabled = os.path.exists(PROC_STAT) and os.path.exists("/proc/self/stat")
        self._ncpu = 0  # CPUs of ours /proc/stat listed at the last sample
        self._last = self._sample() if self.enabled else None
        self._next = time.monotonic() + interval

    def _sample(self) -> tuple[int, int, int]:
        busy, total, self._ncpu = _cpu_ticks(self.cpus)
        return busy, total, _own_ticks()

    def others_busy(self, before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
        """Cores of our affinity set kept busy by other processes between two samples (our own
        threads run only there, so their time is all inside the sums)."""
        d_busy, d_total, d_own = (a - b for a, b in zip(after, before))
        if d_total <= 0:
            return 0.0
        return max(0.0, (d_busy - d_own) / d_total * self._ncpu)

    def update(self) -> int:
        """Call once per step; re-decides at most once per `interval` seconds. Returns the thread count."""
        if not self.enabled or time.monotonic() < self._next:
            return torch.get_num_threads()
        now = self._sample()
        want = threads_for(self.cores, self.others_busy(self._last, now), self.max_threads)
        self._last, self._next = now, time.monotonic() + self.interval
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
        return want
