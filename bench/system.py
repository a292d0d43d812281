"""What the harness reads from and sets on the machine: /proc samples, CPU pinning, the fd limit."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
SERVER_CPU = "0"  # the server under test alone on one core
CLIENT_CPU = "1"  # load generator, writers and Postgres on the other


# The cores this process may use, read once at import: after pin_self() the harness itself sees only the
# client core, and asking again then made every later `pinned()` a no-op, so the servers under test ran on
# the client core with Postgres, the writers and the load generator.
_CORES = frozenset(os.sched_getaffinity(0))


def cores() -> int:
    return len(_CORES)


def pinning_possible() -> bool:
    return {int(SERVER_CPU), int(CLIENT_CPU)} <= _CORES


def pin_self(cpu: str = CLIENT_CPU) -> None:
    """Keep the harness (and the processes it starts unpinned) off the server's core."""
    if pinning_possible():
        os.sched_setaffinity(0, {int(c) for c in cpu.split(",")})


def pin_pid(pid: int, cpu: str) -> None:
    """Pin a running process and all its threads (e.g. the postmaster; its future backends inherit it)."""
    if pinning_possible():
        subprocess.run(["taskset", "-a", "-c", "-p", cpu, str(pid)], capture_output=True, check=False)


def pinned(command: list[str], cpu: str) -> list[str]:
    return ["taskset", "-c", cpu, *command] if pinning_possible() else command


def raise_fd_limit() -> int:
    """Lift the soft (and, as root, the hard) fd limit so 20,000 streams fit; return the soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200_000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def children(pid: int) -> list[int]:
    """Direct children of pid (nginx's worker under its master)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in task.read_text().split()]
    return found


@dataclass(frozen=True)
class Sample:
    at: float
    cpu_seconds: float
    rss_kb: int


def sample(pids: list[int]) -> Sample:
    """CPU seconds (user+system) and RSS summed over pids; vanished pids count zero."""
    cpu = 0.0
    rss = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            statm = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        rss += int(statm[1]) * PAGE_KB
    return Sample(time.monotonic(), cpu, rss)


def cpu_percent(before: Sample, after: Sample) -> float:
    elapsed = after.at - before.at
    return 100.0 * (after.cpu_seconds - before.cpu_seconds) / elapsed if elapsed > 0 else 0.0


def machine() -> str:
    """One line naming the machine, for RESULTS.md."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({model}), {mem_gb:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )
