"""What every benchmark shares: repeated timing, peak memory, machine description."""
import ctypes
import ctypes.util
import os
import platform
import resource
import statistics
import subprocess
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Spread:
    """Median of several measurements with their range (seconds, bytes or any unit)."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values) -> "Spread":
        """The spread of a non-empty list of numbers."""
        values = list(values)
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> "Spread":
        """The same spread in another unit (e.g. seconds to milliseconds)."""
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.runs)

    def text(self, digits: int = 1) -> str:
        """``median (low–high, n=runs)``, or just the value for one run."""
        if self.runs == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}–{self.high:.{digits}f}, n={self.runs})"


CPU = torch.device("cpu")


def repeat(fn, runs: int, warmup: int = 1, device=CPU) -> Spread:
    """Seconds per call of ``fn()`` over ``runs`` calls after ``warmup`` untimed ones."""
    return measure(fn, runs, warmup, device, track_memory=False)[0]


def measure(fn, runs: int, warmup: int = 0, device=CPU, track_memory: bool = True):
    """Call ``fn()`` ``warmup + runs`` times; return (time Spread of the timed calls, largest
    peak memory above the start of a call in bytes (0 without ``track_memory``), the last
    result)."""
    for _ in range(warmup):
        fn()
    times, peak, result = [], 0, None
    for _ in range(runs):
        with PeakRSS() if track_memory else nullcontext() as mem:
            sync(device)
            start = time.perf_counter()
            result = fn()
            sync(device)
            times.append(time.perf_counter() - start)
        peak = max(peak, mem.above_start) if track_memory else 0
    return Spread.of(times), peak, result


def current_rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; the lifetime peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: ru_maxrss is KiB on Linux/BSD, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024


def release_free_memory() -> None:
    """Hand the heap's freed blocks back to the OS (glibc only; elsewhere a no-op), so that a
    later peak counts what a block allocates and not what earlier code left free."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


class PeakRSS:
    """Context manager: the peak resident memory while the block runs, sampled every 2 ms.

    ``peak`` (bytes) is the largest sample; ``above_start`` is that minus the memory at entry,
    i.e. what the block needed on top of what was already there. Torch and numpy release the
    GIL in their kernels, so the sampling thread keeps running during long calls.
    """

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.start = interval, 0, 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self):
        release_free_memory()
        self._stop = threading.Event()
        self.start = self.peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        return False

    @property
    def above_start(self) -> int:
        """Bytes of the peak above the memory at entry."""
        return self.peak - self.start


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str:
    """The checkout's commit (``git describe --always --dirty``: ``-dirty`` when files were
    changed), or a note when this is not a git checkout."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parents[1], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not found)"
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def machine() -> dict:
    """Where the numbers come from: CPU, cores, torch threads, GPU, library versions."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": gpu, "python": platform.python_version(), "torch": torch.__version__,
            "code": code_version(),
            "os": f"{platform.system()} {platform.release()}",
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


MB = 1 << 20
