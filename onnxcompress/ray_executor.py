"""Jobs as Ray tasks (`--executor ray`): the `map(fn, items)` of `executor`, on the cluster at
`--ray-address` (else $RAY_ADDRESS, else a local cluster started for the run).

Ray is an optional extra (`pip install "onnxcompress[ray]"`); only this module imports it, and
only inside functions. A job whose worker process dies (killed, out of memory, its node lost)
is run again by Ray up to MAX_RETRIES times; a job that raises is not (the same input fails
the same way). Every node must have the same onnxcompress installed: tasks name their
functions by module.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from onnxcompress.errors import CompressError
from onnxcompress.jobs import THREAD_VARIABLES, job_error

T = TypeVar("T")
R = TypeVar("R")

INSTALL = 'pip install "onnxcompress[ray]"'
# Runs of a job after its worker process died; Ray's own default, said out loud.
MAX_RETRIES = 3
# Seconds to open a TCP connection to the address before calling it unreachable.
CONNECT_SECONDS = 5.0
# Seconds a trial connection may take: Ray's own client retries for ~20 s before it says why.
PROBE_SECONDS = 30.0
# Addresses Ray resolves itself: "auto" a cluster already running on this machine, "local" a
# new one.
NAMED_ADDRESSES = ("auto", "local")
_PROBE = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False)"
# Workers' output stays in their log files; ray's own log lines only for errors.
QUIET = {"log_to_driver": False, "logging_level": logging.ERROR}
_REACHED: set[str] = set()  # addresses probed in this process, so a run probes once


def require_ray():
    """The `ray` module, or CompressError with the install command."""
    try:
        import ray
    except ImportError as exc:
        raise CompressError(f"--executor ray needs Ray ({exc}): {INSTALL}") from None
    return ray


def cluster_address(address: str | None) -> str | None:
    """The address asked for, else $RAY_ADDRESS, else None (a local cluster)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def check_cluster(address: str | None) -> None:
    """CompressError unless Ray imports and, for an address, a cluster answers there within
    CONNECT_SECONDS (TCP) and PROBE_SECONDS (a trial connection in a child process, whose
    retries and log lines never reach the user's terminal)."""
    require_ray()
    address = cluster_address(address)
    if address in (None, "local") or address in _REACHED:  # "local": a new cluster, here
        return
    if address not in NAMED_ADDRESSES:
        host, port = split_address(address)
        try:
            socket.create_connection((host, port), timeout=CONNECT_SECONDS).close()
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            raise CompressError(f"no Ray cluster at {address}: cannot connect ({why})") from None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE, address],
            capture_output=True,
            text=True,
            timeout=PROBE_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise CompressError(
            f"no Ray cluster answered at {address} within {PROBE_SECONDS:g} s (a Ray head's "
            "address is HOST:6379 by default, or ray://HOST:10001 for Ray Client)"
        ) from None
    if probe.returncode != 0:
        raise CompressError(f"no Ray cluster at {address}: {_why(probe.stderr)}")
    _REACHED.add(address)


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT" or "ray://HOST:PORT"; CompressError for anything else."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]]+?)\]?:(\d{1,5})", address.strip())
    if not match or not 0 < int(match[2]) < 65536:
        raise CompressError(
            f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT, auto or local"
        )
    return match[1], int(match[2])


def _why(stderr: str) -> str:
    """Ray's final error and the one under it (the cause: refused, wrong token...), one line."""
    errors = [
        line.strip()
        for line in stderr.splitlines()
        if re.match(r"^[\w.]*(Error|Exception): ", line.strip())
    ]
    if not errors:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        return lines[-1][:300] if lines else "the trial connection failed"
    shown = errors[-1] if len(errors) == 1 else f"{errors[-1]} ({errors[-2]})"
    return shown[:400]


@dataclass(frozen=True)
class RayObject:
    """A value shared with Ray tasks: an object in the cluster's store, fetched by `get()`."""

    ref: Any = field(repr=False)

    def get(self) -> Any:
        import ray

        return ray.get(self.ref)


def _run_job(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


class RayExecutor:
    """Jobs as Ray tasks. Connects on first use (to a cluster already connected in this
    process as it is: a test's or the caller's); disconnects on `close` only if it connected."""

    remote = True

    def __init__(self, address: str | None = None, retries: int = MAX_RETRIES):
        self.address = cluster_address(address)
        self.retries = retries
        self._connected_here = False
        self._task = None

    def map(self, fn: Callable[[T], R], items: Iterable[T], cpus: int = 1) -> Iterator[R]:
        """fn(item) as tasks that each reserve `cpus` of the cluster; results in input order."""
        ray = self._connect()
        items = list(items)
        # A task asking for more CPUs than any node has would wait for one forever.
        cpus = max(1, min(cpus, _largest_node_cpus(ray)))
        # A job's numerical libraries keep to the CPUs it reserved, as in worker processes.
        caps = {name: str(cpus) for name in THREAD_VARIABLES}
        task = self._task.options(num_cpus=cpus, runtime_env={"env_vars": caps})
        refs = [task.remote(fn, item) for item in items]
        # Jobs left when one fails are not cancelled: ray.cancel on a task whose result is
        # arriving aborted the driver (Ray 2.60, "Tried to complete task that was not
        # pending"). They finish unread; the driver's exit ends them all.
        for index, (item, ref) in enumerate(zip(items, refs, strict=True)):
            try:
                result = ray.get(ref)
            except Exception as exc:
                raise _failure(ray, index, item, exc) from exc
            yield result

    def share(self, value: Any) -> RayObject:
        """`value` put once into the cluster's object store, for every task to read."""
        return RayObject(self._connect().put(value))

    def close(self) -> None:
        if self._connected_here:
            import ray

            ray.shutdown()
            self._connected_here = False
        self._task = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _connect(self):
        ray = require_ray()
        if not ray.is_initialized():
            check_cluster(self.address)  # bounded: ray.init itself may retry for minutes
            # Without an address, a new cluster ("local"): ray.init() alone would join the
            # last one started on this machine, and wait for it if it has stopped since.
            # It needs no dashboard; a cluster joined keeps its own settings.
            own = {} if self.address else {"address": "local", "include_dashboard": False}
            try:
                ray.init(**{"address": self.address, **own}, **QUIET)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"at {self.address}" if self.address else "on this machine"
                raise CompressError(f"cannot start a Ray cluster {where}: {exc}") from None
            self._connected_here = True
        if self._task is None:
            self._task = ray.remote(max_retries=self.retries)(_run_job)
        return ray


def _largest_node_cpus(ray) -> int:
    nodes = [node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return int(max(nodes, default=1))


def _failure(ray, index: int, item: Any, exc: Exception) -> Exception:
    """What to raise for a failed task: the job's own exception inside Ray's wrapper, named by
    `job_error` (a worker's death has none: Ray's says it); a worker that could not load the
    job (RaySystemError) or what it imports gets one line of advice."""
    cause = getattr(exc, "cause", None)
    cause = cause if isinstance(cause, Exception) else exc
    if not isinstance(cause, (ray.exceptions.RaySystemError, ImportError)):
        return job_error(index, item, cause)
    first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
    return CompressError(
        f"a Ray worker could not run job {index}: {first}; every node needs this onnxcompress "
        f"installed ({INSTALL})"
    )
