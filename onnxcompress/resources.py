"""What the run itself cost: wall time and peak memory, for the report."""

from __future__ import annotations

import sys
import time

# ru_maxrss is in kibibytes on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


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
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_UNIT
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _MAXRSS_UNIT
    return {"wall_seconds": seconds, "peak_memory_bytes": own, "peak_worker_memory_bytes": workers}
