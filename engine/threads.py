"""How many CPU threads torch should use while other processes share the machine.

torch runs each op on `torch.get_num_threads()` OpenMP threads that meet at a barrier after the op.
If another process takes one of the cores, one of our threads is descheduled for a whole time slice
(milliseconds) while the others spin at the barrier: on the README's 2-core machine one busy
process made 2-thread decoding 4 to 110 times slower, while 1 thread lost only about a fifth.

So the governor samples /proc/stat (all processes) and /proc/self/stat (this process) about once a
second, works out how many cores *other* processes kept busy since the last sample, and sets the
thread count to the cores they leave free (at least 1, at most `max_threads`). Reading the two files
costs ~20 us; `update()` is called once per step and does nothing between samples.

Linux only; elsewhere (no /proc) the thread count is left as torch set it.
"""

import os
import time
from typing import Optional

import torch


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_for(cores: int, others_busy: float, max_threads: Optional[int] = None) -> int:
    """Threads for `cores` cores when other processes keep `others_busy` cores busy (a float).

    A core counts as taken once others use more than a quarter of it: a thread that loses a
    quarter of its time slices already stalls its peers at every barrier."""
    taken = max(0, int(others_busy + 0.75))  # 0.25 -> 1, 1.25 -> 2
    n = max(1, cores - taken)
    return min(n, max_threads) if max_threads else n


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot; steal time counts as busy (another tenant)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def _own_ticks() -> int:
    """Clock ticks this process has run (all its threads), user + system."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    return int(fields[11]) + int(fields[12])


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the number of cores other processes leave free."""

    def __init__(self, max_threads: Optional[int] = None, interval: float = 1.0):
        """max_threads: never more (default: torch's thread count now, so a user's own
        torch.set_num_threads(n) stays the ceiling)."""
        self.cores = available_cores()
        self.max_threads, self.interval = max_threads or torch.get_num_threads(), interval
        self.enabled = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self.threads = torch.get_num_threads()  # as last decided
        self._last = self._sample() if self.enabled else None
        self._next = time.monotonic() + interval
        self.changes = 0  # how often the count moved (reported by benchmarks)

    def _sample(self) -> tuple[int, int, int]:
        busy, total = _machine_ticks()
        return busy, total, _own_ticks()

    def others_busy(self, before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
        """Cores kept busy by other processes between two samples."""
        d_busy, d_total, d_own = (a - b for a, b in zip(after, before))
        ncpu = os.cpu_count() or 1  # /proc/stat sums every CPU of the machine, not just ours
        if d_total <= 0:
            return 0.0
        return max(0.0, (d_busy - d_own) / d_total * ncpu)

    def update(self) -> int:
        """Call once per step; re-decides at most once per `interval` seconds. Returns the thread count."""
        if not self.enabled or time.monotonic() < self._next:
            return self.threads
        now = self._sample()
        want = threads_for(self.cores, self.others_busy(self._last, now), self.max_threads)
        self._last, self._next = now, time.monotonic() + self.interval
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            self.changes += 1
        self.threads = want
        return want
