"""Run independent jobs (time a layer, score a candidate) one after another or in worker
processes, behind one `map`. Results come back in input order; a failed job raises with its
item named.

Worker processes are started with "spawn": a forked child inherits the parent's
onnxruntime and BLAS thread pools in whatever state they were in (locks held by threads that
do not exist in the child), which can hang; a spawned child starts a fresh interpreter.
Spawn starts an interpreter per worker, once per pool: keep one executor for a run (see
docs/decisions.md#spawn-cost-per-worker).

A cluster backend (Ray, `onnxcompress/ray_executor.py`, an optional extra) provides the same
`map(fn, items)`. Large inputs every job reads (the model, calibration data) travel as
`share(value)` handles that a job opens with `.get()`: the value itself here, a file for worker
processes, an object in Ray's store on a cluster, never a path only the driver can read. `fn`
and the items must be picklable (module-level functions, plain data, ModelProto).
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Protocol, TypeVar

from onnxcompress.errors import CompressError
from onnxcompress.jobs import THREAD_VARIABLES, job_error
from onnxcompress.jobs import JobError as JobError  # what callers catch, also named here

T = TypeVar("T")
R = TypeVar("R")


class Shared(Protocol):
    """A value handed to many jobs once (see `share`); a job reads it with `get()`."""

    def get(self) -> Any: ...


class Executor(Protocol):
    # Whether jobs may run on other machines (timing jobs then run there, not here).
    remote: bool

    def map(self, fn: Callable[[T], R], items: Iterable[T], cpus: int = 1) -> Iterator[R]:
        """fn(item) for every item, in input order; `cpus`: the cores each job keeps busy
        (a cluster reserves them; local executors run jobs as they were made)."""

    def share(self, value: Any) -> Shared:
        """A handle the jobs of this executor read `value` from, valid until `close`."""

    def close(self) -> None:
        """Stop the workers and drop what was shared (also on leaving a `with` block)."""

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc_info) -> None: ...


@dataclass(frozen=True)
class Held:
    """A value shared with jobs that run in this process: the value itself."""

    value: Any = field(repr=False)

    def get(self) -> Any:
        return self.value


@dataclass(frozen=True)
class PickledFile:
    """A value shared with local worker processes: a pickle they load on `get()`."""

    path: str

    def get(self) -> Any:
        with open(self.path, "rb") as fh:
            return pickle.load(fh)


class SerialExecutor:
    """Jobs in this process, one at a time, lazily."""

    remote = False

    def map(self, fn: Callable[[T], R], items: Iterable[T], cpus: int = 1) -> Iterator[R]:
        for index, item in enumerate(items):
            try:
                yield fn(item)
            except Exception as exc:
                raise job_error(index, item, exc) from exc

    def share(self, value: Any) -> Held:
        return Held(value)

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

    remote = False

    def __init__(self, jobs: int, threads: int = 1):
        if jobs < 1:
            raise CompressError(f"jobs={jobs}: expected at least 1")
        self.jobs = jobs
        self.threads = threads
        self._pool: ProcessPoolExecutor | None = None
        self._folder: str | None = None

    def share(self, value: Any) -> PickledFile:
        """`value` pickled once into this executor's temporary folder (not once per job)."""
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="onnxcompress-jobs-")
        handle, path = tempfile.mkstemp(dir=self._folder, suffix=".pickle")
        with os.fdopen(handle, "wb") as fh:
            pickle.dump(value, fh, protocol=pickle.HIGHEST_PROTOCOL)
        return PickledFile(path)

    def map(self, fn: Callable[[T], R], items: Iterable[T], cpus: int = 1) -> Iterator[R]:
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
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

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


EXECUTORS = ("local", "ray")


def make_executor(
    jobs: int, threads: int = 1, kind: str = "local", address: str | None = None
) -> Executor:
    """`kind` "local": serial for one job, else a process pool of `jobs` workers (see
    ProcessExecutor); "ray": tasks on the Ray cluster at `address` (else $RAY_ADDRESS, else a
    local one), whatever `jobs` says: the cluster's CPUs set how many run at once."""
    if kind not in EXECUTORS:
        raise CompressError(f"executor {kind!r}: one of {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise CompressError(f"jobs={jobs}: expected at least 1")
    if kind == "ray":
        from onnxcompress.ray_executor import RayExecutor  # an optional extra: only when asked

        return RayExecutor(address)
    return SerialExecutor() if jobs == 1 else ProcessExecutor(jobs, threads)


def check_executor(kind: str, address: str | None = None) -> None:
    """CompressError, before a run starts, for an executor this machine cannot use: Ray not
    installed, or no Ray cluster answering at `address` (or $RAY_ADDRESS)."""
    if kind not in EXECUTORS:
        raise CompressError(f"executor {kind!r}: one of {', '.join(EXECUTORS)}")
    if kind == "ray":
        from onnxcompress import ray_executor

        ray_executor.check_cluster(address)


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


def _limit_threads(threads: int) -> None:
    """Runs first in each worker, before the job's modules (numpy) load their BLAS."""
    for variable in THREAD_VARIABLES:
        current = os.environ.get(variable, "")
        limit = min(int(current), threads) if current.isdigit() else threads
        os.environ[variable] = str(max(1, limit))
