"""Executors: order kept, failures name their job, worker processes are other processes."""

import os

import pytest

from onnxcompress.errors import CompressError
from onnxcompress.executor import (
    JobError,
    ProcessExecutor,
    SerialExecutor,
    make_executor,
    threads_per_job,
)


# Jobs are module-level: spawned workers import them by name.
def square_with_pid(x):
    return x * x, os.getpid()


def fail_on_three(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x


def bad_input(x):
    raise CompressError(f"no data for {x}")


def blas_threads(_):
    return os.environ.get("OPENBLAS_NUM_THREADS")


@pytest.fixture(scope="module")
def pool():
    with ProcessExecutor(2, threads=1) as executor:
        yield executor


def test_make_executor_picks_serial_for_one_job():
    assert isinstance(make_executor(1), SerialExecutor)
    assert isinstance(make_executor(3), ProcessExecutor)
    with pytest.raises(CompressError):
        make_executor(0)


def test_serial_keeps_order_and_runs_here():
    results = list(SerialExecutor().map(square_with_pid, range(5)))
    assert [r for r, _ in results] == [0, 1, 4, 9, 16]
    assert {pid for _, pid in results} == {os.getpid()}


def test_processes_keep_order_and_run_elsewhere(pool):
    items = list(range(40))
    results = list(pool.map(square_with_pid, items))
    assert [r for r, _ in results] == [x * x for x in items]
    assert os.getpid() not in {pid for _, pid in results}
    # The pool is reused by a second map.
    assert [r for r, _ in pool.map(square_with_pid, [7])] == [49]


@pytest.mark.parametrize("executor", ["serial", "processes"])
def test_a_failed_job_raises_with_its_item(executor, pool):
    runner = SerialExecutor() if executor == "serial" else pool
    results = runner.map(fail_on_three, [1, 2, 3, 4])
    assert next(results) == 1 and next(results) == 2
    with pytest.raises(
        JobError, match=r"job 2 \(3\) failed: ValueError: three is not allowed"
    ) as info:
        next(results)
    assert info.value.item == 3
    assert isinstance(info.value.__cause__, ValueError)


def test_a_bad_input_in_a_job_stays_a_compress_error(pool):
    with pytest.raises(CompressError, match=r"job 0 \('a.npz'\) failed: .*no data for a.npz"):
        list(pool.map(bad_input, ["a.npz"]))


def test_workers_limit_their_blas_threads(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")  # what the workers inherit
    with ProcessExecutor(1, threads=2) as executor:
        assert list(executor.map(blas_threads, range(2))) == ["2", "2"]


def test_threads_per_job_keeps_the_product_within_the_cpus():
    assert threads_per_job(1, 4, cpus=8) == 4
    assert threads_per_job(2, 4, cpus=8) == 4
    assert threads_per_job(4, 4, cpus=8) == 2
    assert threads_per_job(3, 4, cpus=8) == 2
    assert threads_per_job(16, 4, cpus=8) == 1
    for jobs in range(1, 9):
        assert jobs * threads_per_job(jobs, 8, cpus=8) <= 8


def total_of_shared(item):
    shared, scale = item
    return sum(shared.get()) * scale


@pytest.mark.parametrize("executor", ["serial", "processes"])
def test_a_shared_value_reaches_every_job(executor, pool):
    runner = SerialExecutor() if executor == "serial" else pool
    shared = runner.share([1, 2, 3])
    assert list(runner.map(total_of_shared, [(shared, 1), (shared, 10)])) == [6, 60]


def test_closing_the_process_pool_removes_what_it_shared():
    with ProcessExecutor(1) as executor:
        shared = executor.share(list(range(1000)))
        assert os.path.exists(shared.path)
    assert not os.path.exists(shared.path)


def test_an_unknown_executor_is_refused():
    with pytest.raises(CompressError, match="one of local, ray"):
        make_executor(1, kind="spark")
