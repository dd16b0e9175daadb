"""A busy machine for the benchmarks' --busy flag: another process spinning on one core beside them.

One pure-Python loop keeps exactly one core busy (no threads, no I/O), which is what a second job on a
shared machine does to us: torch's OpenMP threads then lose one core for whole time slices."""

import atexit
import subprocess
import sys


def spin_one_core() -> subprocess.Popen:
    """Start the spinner; it is killed when this process exits (or earlier by the caller)."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    atexit.register(spinner.kill)
    return spinner
