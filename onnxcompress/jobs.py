"""What every executor's jobs share: the error a failed job raises (its item named), and the
thread pools a job keeps to its share of the cores. Apart from `executor` so that the backends
it loads lazily (`ray_executor`) import it without an import circle."""

from __future__ import annotations

from typing import Any

from onnxcompress.errors import CompressError

# Thread pools of numerical libraries a worker should keep to its share of the cores.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class JobError(RuntimeError):
    """A job failed; `item` is what it was given, the cause is the job's own exception."""

    def __init__(self, message: str, item: Any):
        super().__init__(message)
        self.item = item


def job_error(index: int, item: Any, exc: Exception) -> Exception:
    """The exception to raise for a failed job: the job's message with its item in front; a
    CompressError stays one (bad input is bad input, wherever it is found)."""
    shown = repr(item)
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    message = f"job {index} ({shown}) failed: {type(exc).__name__}: {exc}"
    return CompressError(message) if isinstance(exc, CompressError) else JobError(message, item)
