"""CPU time and RSS of a process *and its descendants* (gomail's parser
processes are spawned children of the daemon), read from /proc without psutil."""

from __future__ import annotations

import os
import threading

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 = index 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


class TreeCPU:
    """A snapshot of CPU seconds (user + system) of a process tree.

    ``snapshot() - earlier`` gives CPU used in between: live processes count
    by their own utime+stime (a process that appeared since counts from 0)
    and processes that exited and were reaped count through the root's
    cutime+cstime.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.per_pid: dict[int, float] = {}
        self.reaped = 0.0
        for pid in descendants(root):
            fields = _stat(pid)
            if fields is None:
                continue
            self.per_pid[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
            if pid == root:
                self.reaped = (int(fields[13]) + int(fields[14])) / _TICKS

    def since(self, earlier: TreeCPU) -> tuple[float, float]:
        """(CPU seconds of the root, CPU seconds of its descendants) since ``earlier``."""
        root = self.per_pid.get(self.root, 0.0) - earlier.per_pid.get(self.root, 0.0)
        rest = sum(v - earlier.per_pid.get(pid, 0.0) for pid, v in self.per_pid.items() if pid != self.root)
        rest += self.reaped - earlier.reaped
        return root, rest


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
    except (OSError, IndexError, ValueError):
        return 0


class TreeRSSSampler(threading.Thread):
    """Peak RSS of the root alone and of the whole tree, sampled every 50 ms
    (the list of descendants is refreshed every second)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak_root_kib = 0
        self.peak_tree_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        pids = descendants(self.root)
        n = 0
        while not self._stop_event.wait(0.05):
            n += 1
            if n % 20 == 0:
                pids = descendants(self.root)
            sizes = [_rss_kib(p) for p in pids]
            self.peak_root_kib = max(self.peak_root_kib, _rss_kib(self.root))
            self.peak_tree_kib = max(self.peak_tree_kib, sum(sizes))

    def stop(self) -> tuple[int, int]:
        self._stop_event.set()
        self.join(2)
        return self.peak_root_kib, self.peak_tree_kib


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICKS


class OtherLoad:
    """CPU used by processes *not* started by this benchmark during an interval
    (other people's work on a shared machine), in average cores."""

    def __init__(self) -> None:
        self.busy = system_busy_seconds()
        self.own = TreeCPU(os.getpid())
        self.started = _monotonic()

    def cores(self) -> float:
        busy = system_busy_seconds() - self.busy
        own = sum(TreeCPU(os.getpid()).since(self.own))
        return max(0.0, busy - own) / max(1e-9, _monotonic() - self.started)


def _monotonic() -> float:
    import time

    return time.monotonic()
