"""Worker threads shared by the coding paths (probability tables, channel search, pipelined coding).

Why persistent pools: a codec step builds its tables or searches its chunks in a few threads for a
few milliseconds.  Starting fresh threads for every step can cost as much as the work itself on a small,
busy machine (each start waits for the scheduler), so every purpose keeps one pool for the process.
Pools are per purpose because a task of one pool may wait on another pool's tasks (the pipelined
coder builds tables), and a pool must never wait on its own tasks.  After ``fork`` the child starts
with no pools: the parent's threads do not exist there.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def pool(purpose: str, workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads for ``purpose`` (created on first use)."""
    key = (purpose, max(1, int(workers)))
    with _lock:
        p = _pools.get(key)
        if p is None:
            p = _pools[key] = ThreadPoolExecutor(key[1], thread_name_prefix=f"diffcodec-{purpose}")
        return p


def _forget_pools() -> None:
    global _lock
    _pools.clear()
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
