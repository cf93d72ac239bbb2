"""How many compute threads the CPU executor uses, adjusted while it runs.

On a shared machine a thread pool as wide as the cores loses badly: every operation ends at a
barrier that waits for the slowest thread, and a thread whose core went to another process
stalls all of them (single-stream decode fell to 0.03-0.09x beside three busy processes, while
one thread kept ~0.3x). The governor samples how many other tasks want to run (/proc/loadavg)
between steps and narrows the pool to the cores nobody else is using, widening it again when
they are free. Its decision is a pure function, so it is tested without a busy machine.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path


def runnable_tasks() -> int | None:
    """Tasks runnable right now on the whole machine (including this process's threads)."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def threads_for(cores: int, others: float) -> int:
    """Threads to use when `others` tasks (on average) compete for `cores` cores."""
    free = cores - int(others + 0.5)
    return max(1, min(cores, free))


class ThreadGovernor:
    """Keeps a window of samples of competing tasks and re-decides the pool size now and then."""

    def __init__(
        self, cores: int, window: int = 16, interval_s: float = 1.0, read=runnable_tasks
    ) -> None:
        self.cores = cores
        self.threads = cores
        self.window = window
        self.samples: deque[float] = deque(maxlen=window)
        self.interval_s = interval_s
        self.read = read
        self._last = time.monotonic()

    def sample(self, own_threads_busy: int) -> int | None:
        """Record one sample; returns a new thread count when it should change, else None."""
        runnable = self.read()
        if runnable is None:
            return None
        self.samples.append(max(0, runnable - own_threads_busy))
        now = time.monotonic()
        if now - self._last < self.interval_s or len(self.samples) < self.window:
            return None
        self._last = now
        wanted = threads_for(self.cores, sum(self.samples) / len(self.samples))
        if wanted == self.threads:
            return None
        self.threads = wanted
        return wanted


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
