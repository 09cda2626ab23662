"""How many intra-op threads a verb that computes uses, and sharing the CPUs with the other egomotion jobs.

Every job taking every core makes OpenMP's workers wait at barriers for threads the kernel has descheduled:
two ``egomotion time`` of the thesis MNIST net side by side on 2 cores ran 6.5x slower each (158 ms per
iteration instead of 24), where one thread each costs 1.4x. So the count is chosen in this order:

1. ``--threads N``: exactly N, for the whole run (the last bits of a CPU convolution's weight gradient
   depend on the thread count, so this is the flag for bit-reproducible runs);
2. ``OMP_NUM_THREADS``: the same, read as OpenMP reads it (the first number of a list);
3. otherwise, automatic: the CPUs this process may use (its affinity, and its cgroup's CPU quota) divided
   among the egomotion jobs that share them, at least one each. Every job registers in a per-user folder
   (a file it holds locked while it lives, naming its CPUs); :func:`rebalance`, polled by the loops, looks
   again every second, so a job alone gets every CPU back when the others end. Jobs with a fixed count
   (1. and 2., and the experiment engine's trainings) register too, and the automatic ones share what
   they leave. Processes that are not egomotion jobs are not seen.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from converter.errors import CaffeError

POLL_SECONDS = 1.0
"""How often an automatic share looks at the other jobs again (a listdir and a lock attempt per job)."""


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
                     ) -> float | None:
    """The CPUs this process's cgroup may use per period (``cpu.max`` of cgroup v2, or v1's
    ``cpu.cfs_quota_us / cpu.cfs_period_us``), the tightest along its path; None when unlimited or unknown."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: cpu.max in each folder from the process's up to the root
            folder = root / path.lstrip("/")
            while True:
                try:
                    quota, period = (folder / "cpu.max").read_text().split()[:2]
                    if quota != "max":
                        limits.append(int(quota) / int(period))
                except (OSError, ValueError):
                    pass
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):
            for mount in (root / "cpu,cpuacct", root / "cpu"):
                try:
                    quota = int((mount / path.lstrip("/") / "cpu.cfs_quota_us").read_text())
                    period = int((mount / path.lstrip("/") / "cpu.cfs_period_us").read_text())
                except (OSError, ValueError):
                    continue
                if quota > 0 and period > 0:
                    limits.append(quota / period)
                break
    return min(limits) if limits else None


def affinity() -> set[int]:
    """The CPUs the kernel lets this process run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def usable_cpus() -> int:
    """The CPUs this process may really use: its affinity, capped by its cgroup's CPU quota (rounded up)."""
    count = len(affinity())
    quota = cgroup_cpu_quota()
    return max(1, min(count, math.ceil(quota))) if quota else count


@dataclass
class ThreadChoice:
    count: int
    source: str  # "--threads", "OMP_NUM_THREADS" or "auto"
    usable: int

    def describe(self, jobs: int = 1, fixed: int = 0) -> str:
        if self.source != "auto":
            return f"{self.count} intra-op thread(s) ({self.source})"
        shared = f", shared by {jobs} egomotion jobs" if jobs > 1 else ""
        shared += f", {fixed} taken by jobs with a fixed count" if fixed else ""
        return (f"{self.count} intra-op thread(s) (automatic: {self.usable} usable CPU(s){shared}; --threads N "
                "fixes the count, and with it the last bits of the results)")


def choose_threads(flag: int | None, environ: dict[str, str] | None = None) -> ThreadChoice:
    """The thread count from ``--threads``, else ``OMP_NUM_THREADS``, else every usable CPU (before sharing)."""
    usable = usable_cpus()
    if flag is not None:
        if flag < 1:
            raise CaffeError(f"--threads must be 1 or more, got {flag}")
        return ThreadChoice(flag, "--threads", usable)
    omp = omp_num_threads(environ)
    if omp is not None:
        return ThreadChoice(omp, "OMP_NUM_THREADS", usable)
    return ThreadChoice(usable, "auto", usable)


def omp_num_threads(environ: dict[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` as OpenMP reads it (the first number of a list), None when unset. A value OpenMP
    cannot read is refused: the CLI checks it before torch loads (libgomp would print its own warning)."""
    text = (os.environ if environ is None else environ).get("OMP_NUM_THREADS", "").strip()
    if not text:
        return None
    first = text.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise CaffeError(f"OMP_NUM_THREADS='{text}' is not a positive thread count")
    return int(first)


def jobs_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"egomotion-jobs-{os.getuid()}"


class CpuShare:
    """This process's entry among the egomotion jobs, and its share of the CPUs when the choice is automatic.

    The entry is a file ``<pid>.<n>`` holding this process's CPU list and thread count (``auto`` for an
    automatic one), locked (``flock``) while the process lives: another job counts it when it cannot take
    the lock, and removes it when it can (its owner died without cleaning up). Only jobs whose CPUs overlap
    ours are counted. A job with a fixed count keeps it; the automatic ones share what the fixed ones leave."""

    _serial = 0

    def __init__(self, choice: ThreadChoice, folder: Path | None = None):
        import torch

        self.choice, self.folder = choice, folder or jobs_folder()
        self.cpus = affinity()
        self.jobs, self.fixed, self.next_poll = 1, 0, 0.0
        self.before = torch.get_num_threads()
        self.file = None
        self._register()
        torch.set_num_threads(choice.count)
        self.rebalance(force=True)

    @property
    def automatic(self) -> bool:
        return self.choice.source == "auto"

    def _register(self) -> None:
        CpuShare._serial += 1
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            self.path = self.folder / f"{os.getpid()}.{CpuShare._serial}"
            self.file = open(self.path, "w")  # noqa: SIM115 - held for the job's life
            fcntl.flock(self.file, fcntl.LOCK_EX)
            count = "auto" if self.automatic else str(self.choice.count)
            self.file.write(f"{','.join(map(str, sorted(self.cpus)))};{count}")
            self.file.flush()
        except OSError:  # no shared folder: the job runs alone as far as it knows
            self.file = None
            return
        self.others()  # removes the entries of jobs that died (a process pool's workers end without cleaning up)

    def others(self) -> tuple[int, int]:
        """The other live jobs whose CPUs overlap ours: (how many are automatic, the threads the fixed ones use)."""
        automatic = fixed = 0
        try:
            names = os.listdir(self.folder)
        except OSError:
            return 0, 0
        for name in names:
            path = self.folder / name
            if self.file is not None and path == self.path:
                continue
            try:
                with open(path) as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    except OSError as e:
                        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                            continue
                        cpu_text, _, count = f.read().partition(";")
                        cpus = {int(c) for c in cpu_text.split(",") if c.strip().isdigit()}
                        if cpus and not cpus & self.cpus:
                            continue
                        if count.strip().isdigit():
                            fixed += int(count)
                        else:  # automatic, or an entry still being written
                            automatic += 1
                        continue
                    path.unlink(missing_ok=True)  # its owner is gone
            except OSError:
                continue
        return automatic, fixed

    def rebalance(self, force: bool = False) -> str | None:
        """In automatic mode, at most once a second: threads = (usable CPUs - the fixed jobs' threads) // the
        automatic jobs (>= 1). Returns a line for the log when the count changed."""
        if self.file is None or not self.automatic:
            return None
        now = time.monotonic()
        if not force and now < self.next_poll:
            return None
        self.next_poll = now + POLL_SECONDS
        automatic, self.fixed = self.others()
        self.jobs = 1 + automatic
        count = max(1, (self.choice.usable - self.fixed) // self.jobs)
        if count == self.choice.count:
            return None
        before, self.choice.count = self.choice.count, count
        import torch

        torch.set_num_threads(count)
        fixed = f" ({self.fixed} thread(s) taken by jobs with a fixed count)" if self.fixed else ""
        return (f"Intra-op threads {before} -> {count}: {self.jobs} egomotion job(s) share {self.choice.usable} "
                f"CPU(s){fixed}")

    def close(self) -> None:
        if self.file is not None:
            self.path.unlink(missing_ok=True)
            self.file.close()
            self.file = None
        import torch

        torch.set_num_threads(self.before)


_ACTIVE: list[CpuShare] = []


def start(flag: int | None) -> CpuShare:
    """Choose and apply this verb's thread count (see the module's docstring); :func:`stop` undoes it."""
    share = CpuShare(choose_threads(flag))
    _ACTIVE.append(share)
    return share


def stop() -> None:
    """Undo the latest :func:`start`: its entry removed, torch's thread count as it was."""
    if _ACTIVE:
        _ACTIVE.pop().close()


@contextlib.contextmanager
def chosen(flag: int | None) -> Iterator[CpuShare]:
    """:func:`start` for the block, :func:`stop` after it (only when the start succeeded)."""
    share = start(flag)
    try:
        yield share
    finally:
        stop()


def rebalance(log=None) -> None:
    """Called by the loops of train, test and time: cheap unless a second has passed; a change is logged."""
    change = _ACTIVE[-1].rebalance() if _ACTIVE else None
    if change and log is not None:
        log.line("threads.py:1", change)


def describe() -> str | None:
    """The log header's line on threads, when a verb chose them."""
    return _ACTIVE[-1].choice.describe(_ACTIVE[-1].jobs, _ACTIVE[-1].fixed) if _ACTIVE else None
