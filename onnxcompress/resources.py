"""What the run itself cost: wall time and peak memory, for the report."""

from __future__ import annotations

import sys
import time

# ru_maxrss is in kibibytes on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def _high_water_mark() -> int | None:
    """This process's peak resident memory from /proc (Linux), else None. ru_maxrss survives
    exec: a run started from a large process (a script that holds data and calls the CLI)
    would report its parent's peak as its own."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            line = next((x for x in status if x.startswith("VmHWM:")), None)
    except OSError:
        return None
    return int(line.split()[1]) * 1024 if line else None


def run_resources(started: float) -> dict[str, float | int | None]:
    """Seconds since `started` (a `time.perf_counter()` reading) and the peak resident memory
    of this process and of its largest worker process, in bytes (None where the platform has
    no `resource` module). The peak is the process's since it started: in a library call, of
    everything the caller did before too."""
    seconds = round(time.perf_counter() - started, 3)
    try:
        import resource
    except ImportError:  # Windows
        return {
            "wall_seconds": seconds,
            "peak_memory_bytes": None,
            "peak_worker_memory_bytes": None,
        }
    own = _high_water_mark() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _MAXRSS_UNIT
    return {"wall_seconds": seconds, "peak_memory_bytes": own, "peak_worker_memory_bytes": workers}
