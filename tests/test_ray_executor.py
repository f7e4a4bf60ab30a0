"""The Ray executor on a local 2-CPU cluster: order kept, failures name their job, a worker
killed mid-job is retried, timing jobs time (and key the cache) on the worker's machine,
`auto` on ResNet-20 plans as the serial run does; and the CLI's refusals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxcompress.passes import get_pass

from models.fixtures import vgg_style
from onnxcompress.analyse import analyse
from onnxcompress.auto import latency_cache, layer_timing
from onnxcompress.auto.sensitivity import Measured
from onnxcompress.errors import CompressError
from onnxcompress.executor import JobError, SerialExecutor, make_executor
from onnxcompress.layers import conv_layers
from onnxcompress.passkit import PassContext
from onnxcompress.ray_executor import INSTALL, RayExecutor
from tests.conftest import REPO, shared_model
from tests.test_executor import bad_input, fail_on_three

ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "onnxcompress[ray]"')


@pytest.fixture(scope="module")
def worker_cache(tmp_path_factory) -> Path:
    """The cache folder of the cluster's workers (they inherit it when the cluster starts)."""
    return tmp_path_factory.mktemp("worker_cache")


@pytest.fixture(scope="module")
def cluster(worker_cache):
    # Workers inherit the environment the cluster starts in: their cache folder, and this
    # checkout on their path (they import tests/, models/, benchmarks/ by name).
    saved = {name: os.environ.get(name) for name in (latency_cache.ENV_VAR, "PYTHONPATH")}
    os.environ[latency_cache.ENV_VAR] = str(worker_cache)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), saved["PYTHONPATH"]]))
    # "local": a new cluster, never one left running on this machine.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield
    ray.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name)
        else:
            os.environ[name] = value


@pytest.fixture
def driver_cache(tmp_path, monkeypatch) -> Path:
    """This process's own cache folder, apart from the workers'."""
    folder = tmp_path / "driver_cache"
    monkeypatch.setenv(latency_cache.ENV_VAR, str(folder))
    return folder


# Jobs are module-level: workers import them by name.
def square_with_pid(x):
    return x * x, os.getpid(), os.environ.get("OPENBLAS_NUM_THREADS")


def import_what_the_worker_lacks(_):
    import onnxcompress.not_installed_here  # noqa: F401


def die_the_first_time(marker: str) -> str:
    """Kills its own worker process the first time (the marker file says it was tried)."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return f"done after worker {Path(marker).read_text()} died"


def sum_shared(item):
    shared, scale = item
    return float(shared.get().sum()) * scale


def test_map_keeps_order_runs_in_workers_and_caps_their_threads(cluster):
    with RayExecutor() as pool:
        results = list(pool.map(square_with_pid, range(12)))
        assert [r for r, _, _ in results] == [x * x for x in range(12)]
        assert os.getpid() not in {pid for _, pid, _ in results}
        assert {threads for _, _, threads in results} == {"1"}
        shared = pool.share(np.arange(10.0))
        assert list(pool.map(sum_shared, [(shared, 1), (shared, 2)])) == [45.0, 90.0]
        # More CPUs a job than any node has: it runs on the largest, not waits for ever.
        ((_, _, threads),) = pool.map(square_with_pid, [5], cpus=64)
        assert threads == "2"
    assert ray.is_initialized()  # a cluster it did not start is left running


def test_a_failed_job_names_its_item_and_bad_input_stays_a_compress_error(cluster):
    pool = RayExecutor()
    with pytest.raises(JobError, match=r"job 2 \(3\) failed: ValueError: three is not allowed"):
        list(pool.map(fail_on_three, [1, 2, 3, 4]))
    with pytest.raises(CompressError, match=r"job 0 \('a.npz'\) failed: .*no data for a.npz"):
        list(pool.map(bad_input, ["a.npz"]))


def test_a_worker_without_what_the_job_imports_says_to_install_it(cluster):
    with pytest.raises(CompressError, match=r"job 0: .*not_installed_here.*every node needs"):
        list(RayExecutor().map(import_what_the_worker_lacks, [0]))


def test_a_worker_killed_mid_job_is_retried(cluster, tmp_path):
    marker = tmp_path / "tried"
    (result,) = RayExecutor().map(die_the_first_time, [str(marker)])
    assert marker.exists() and result.startswith("done after worker")
    assert int(marker.read_text()) != os.getpid()


def test_without_retries_a_killed_worker_fails_its_job(cluster, tmp_path):
    with pytest.raises(JobError, match=r"job 0 .* failed: .*"):
        list(RayExecutor(retries=0).map(die_the_first_time, [str(tmp_path / "tried")]))


def _timing_job() -> layer_timing.TimingJob:
    """The first conv of a fixture model, timed against itself as its candidate."""
    model = vgg_style()
    layer = conv_layers(model, analyse(model, {"input": [1, 3, 32, 32]}))[0][0]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {name: weights[name] for name in layer.node.input if name in weights}
    shapes = [(name, list(w.shape), 1) for name, w in weights.items()]
    same = Measured(
        layer.name, "same", 0.0, "weights", None, [layer.node.SerializeToString()], shapes
    )
    return layer_timing.TimingJob(layer.name, {"svd": layer}, weights, [("svd", same)], threads=1)


def test_timing_jobs_time_and_key_the_cache_on_the_workers_machine(
    cluster, worker_cache, driver_cache, monkeypatch
):
    # This process pretends to be another machine: what the workers time must not say so.
    monkeypatch.setattr(latency_cache, "_processor", lambda: "the driver's CPU")
    (remote,) = make_executor(1, kind="ray").map(layer_timing.time_candidates, [_timing_job()])
    assert remote.machine[2] != "the driver's CPU" and remote.keep_ms > 0
    assert not (driver_cache / latency_cache.FILE_NAME).exists()  # nothing timed here
    with sqlite3.connect(worker_cache / latency_cache.FILE_NAME) as stored:
        keys = {row[0] for row in stored.execute("SELECT key FROM timings")}
    (local,) = SerialExecutor().map(layer_timing.time_candidates, [_timing_job()])
    assert local.machine[2] == "the driver's CPU"
    with sqlite3.connect(driver_cache / latency_cache.FILE_NAME) as stored:
        driver_keys = {row[0] for row in stored.execute("SELECT key FROM timings")}
    assert keys and driver_keys and not keys & driver_keys  # same layers, other machine


def test_a_timing_job_for_other_session_settings_is_refused(cluster):
    job = _timing_job()
    other = layer_timing.TimingJob(job.layer, job.layers, job.weights, job.candidates, 1, "basic")
    with pytest.raises(CompressError, match="install the same version on every node"):
        list(RayExecutor().map(layer_timing.time_candidates, [other]))


def _plan(result) -> list[tuple]:
    keys = ("method", "form", "rank")
    return [(r.node, r.status, *(r.details.get(k) for k in keys)) for r in result.records]


def test_auto_on_resnet20_plans_on_ray_as_it_does_serially(cluster, worker_cache, driver_cache):
    model = onnx.load(shared_model("resnet20_cifar10.onnx"))
    name = model.graph.input[0].name
    rng = np.random.default_rng(1)
    calibration = [{name: rng.standard_normal([4, 3, 32, 32]).astype(np.float32)}]
    spec = get_pass("auto")
    options = spec.make_options({"target_macs": 0.6, "methods": "svd", "sensitivity_samples": 4})
    found = {}
    for executor in ("local", "ray"):
        context = PassContext({name: [1, 3, 32, 32]}, calibration, 0, 1, executor=executor)
        found[executor] = spec.run(model, options, context)
    serial, on_ray = _plan(found["local"]), _plan(found["ray"])
    assert sum(1 for row in serial if row[1] == "rewritten") >= 5
    assert on_ray == serial
    assert found["ray"].summary["auto"]["sensitivity"]["executor"] == "ray"
    # Measured by the workers (their cache folder), not read from the serial run's results.
    assert len(list((worker_cache / "sensitivity").glob("*.json"))) >= 5
    damage = [
        {(c["node"], str(c["config"])): c["damage"] for c in run.summary["auto"]["candidates"]}
        for run in (found["local"], found["ray"])
    ]
    assert damage[0].keys() == damage[1].keys()
    for key, value in damage[0].items():
        assert damage[1][key] == pytest.approx(value, rel=1e-4, abs=1e-9)


# What differs between two runs of the same grid: how long things took, and latency.
TIMED = ("seconds", "then_seconds", "latency", "latency_ratio")


def test_the_benchmark_grid_on_ray_gives_the_serial_rows_in_order(cluster, tmp_path, monkeypatch):
    from benchmarks import run
    from tests.test_bench_run import FAST, tiny

    rows = {}
    for executor in ("local", "ray"):
        if executor == "ray":  # the cells must run in the workers, which import their own
            monkeypatch.setattr(run, "run_variant", lambda *args: pytest.fail("ran here"))
        argv = ["--models", "tiny", "--passes", "svd,prune", *FAST, "--no-plots"]
        argv += ["--out", str(tmp_path / executor), "--executor", executor]
        args = run.parse_args(argv, known_models=["tiny"])
        (entry,) = run.run_suite(args, {"tiny": tiny})["models"]
        rows[executor] = [{k: v for k, v in r.items() if k not in TIMED} for r in entry["rows"]]
    assert [r["label"] for r in rows["ray"]] == ["original", "svd@0.5", "prune@0.5"]
    assert rows["ray"] == rows["local"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    model = str(shared_model("resnet20_cifar10.onnx"))
    command = [sys.executable, "-m", "onnxcompress", model, "--passes", "svd", "-q", *args]
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)


def test_without_ray_the_cli_refuses_with_the_install_command(tmp_path):
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    done = _cli("--executor", "ray", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert INSTALL in done.stderr


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--executor", "ray", "--ray-address", f"127.0.0.1:{_closed_port()}"), "cannot connect"),
        (("--executor", "ray", "--ray-address", "not an address"), "expected HOST:PORT"),
        (("--ray-address", "127.0.0.1:6379"), "add --executor ray"),
        (("--executor", "spark"), "invalid choice"),
    ],
)
def test_bad_cluster_options_are_one_line_and_exit_2_quickly(args, message):
    started = time.perf_counter()
    done = _cli(*args)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2  # argparse adds its usage line
    assert time.perf_counter() - started < 30


def test_the_core_and_the_passes_do_not_load_ray():
    code = (
        "import sys, onnxcompress.cli, onnxcompress.pipeline, onnxcompress.passes.auto, "
        "onnxcompress.auto.search; print('ray' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert done.stdout.strip() == "False"
