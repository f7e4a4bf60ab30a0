"""Run independent jobs (time a layer, score a candidate) one after another or in worker
processes, behind one `map`. Results come back in input order; a failed job raises with its
item named.

Worker processes are started with "spawn": a forked child inherits the parent's
onnxruntime and BLAS thread pools in whatever state they were in (locks held by threads that
do not exist in the child), which can hang; a spawned child starts a fresh interpreter.
Spawn starts an interpreter per worker, once per pool: keep one executor for a run (see
docs/decisions.md#spawn-cost-per-worker).

Another backend plugs in by providing the same `map(fn, items)`; e.g. with Ray:
`refs = [ray.remote(fn).remote(item) for item in items]`, then yield `ray.get(ref)` in order,
wrapping failures with `job_error`. `fn` and the items must be picklable (module-level
functions, plain data, ModelProto), as for processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Protocol, TypeVar

from onnxcompress.errors import CompressError

T = TypeVar("T")
R = TypeVar("R")

# Thread pools of numerical libraries a worker should keep to its share of the cores.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class JobError(RuntimeError):
    """A job failed; `item` is what it was given, the cause is the job's own exception."""

    def __init__(self, message: str, item: Any):
        super().__init__(message)
        self.item = item


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """fn(item) for every item, in input order."""


class SerialExecutor:
    """Jobs in this process, one at a time, lazily."""

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        for index, item in enumerate(items):
            try:
                yield fn(item)
            except Exception as exc:
                raise job_error(index, item, exc) from exc

    def close(self) -> None:
        pass

    def __enter__(self) -> SerialExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ProcessExecutor:
    """Jobs in `jobs` spawned worker processes (a pool started on first use, reused until
    `close`). `threads` caps the numerical libraries' threads in each worker (onnxruntime's
    are set per session by the job itself: pass it `threads_per_job(jobs, threads)`)."""

    def __init__(self, jobs: int, threads: int = 1):
        if jobs < 1:
            raise CompressError(f"jobs={jobs}: expected at least 1")
        self.jobs = jobs
        self.threads = threads
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        items = list(items)
        pool = self._start()
        futures: list[Future] = [pool.submit(fn, item) for item in items]
        try:
            for index, (item, future) in enumerate(zip(items, futures, strict=True)):
                try:
                    result = future.result()
                except Exception as exc:
                    raise job_error(index, item, exc) from exc
                yield result
        finally:  # on failure or an abandoned iterator, drop the jobs not yet started
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ProcessExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=get_context("spawn"),
                initializer=_limit_threads,
                initargs=(self.threads,),
            )
        return self._pool


def make_executor(jobs: int, threads: int = 1) -> SerialExecutor | ProcessExecutor:
    """Serial for one job, else a process pool of `jobs` workers (see ProcessExecutor)."""
    if jobs < 1:
        raise CompressError(f"jobs={jobs}: expected at least 1")
    return SerialExecutor() if jobs == 1 else ProcessExecutor(jobs, threads)


def threads_per_job(jobs: int, threads: int, cpus: int | None = None) -> int:
    """onnxruntime threads per job: at most `threads`, and jobs × result ≤ the CPUs this
    process may use (at least 1; more jobs than CPUs then oversubscribes, one thread each)."""
    cpus = cpus if cpus is not None else available_cpus()
    return max(1, min(threads, cpus // max(1, jobs)))


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_error(index: int, item: Any, exc: Exception) -> Exception:
    """The exception to raise for a failed job: the job's message with its item in front; a
    CompressError stays one (bad input is bad input, wherever it is found)."""
    shown = repr(item)
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    message = f"job {index} ({shown}) failed: {type(exc).__name__}: {exc}"
    return CompressError(message) if isinstance(exc, CompressError) else JobError(message, item)


def _limit_threads(threads: int) -> None:
    """Runs first in each worker, before the job's modules (numpy) load their BLAS."""
    for variable in THREAD_VARIABLES:
        current = os.environ.get(variable, "")
        limit = min(int(current), threads) if current.isdigit() else threads
        os.environ[variable] = str(max(1, limit))
