"""The persistent latency cache: keys, hits, persistence, fallback, concurrent writers."""

import logging
import multiprocessing
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxcompress import benchmark
from onnxcompress.auto import latency_cache as latency_cache
from onnxcompress.auto import layer_timing as layer_timing
from onnxcompress.auto.latency_cache import LatencyCache, Timing, model_key, time_subgraph


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(latency_cache.ENV_VAR, str(folder))
    return folder


def conv_model(channels=4, kernel=3, stride=1, size=8, seed=0, names=("x", "w", "y")):
    x_name, w_name, y_name = names
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((channels, 3, kernel, kernel)).astype(np.float32)
    node = helper.make_node("Conv", [x_name, w_name], [y_name], strides=[stride, stride])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(y_name, onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, w_name)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds_for(size=8, name="x"):
    return {name: np.zeros((1, 3, size, size), np.float32)}


def key(model=None, size=8, threads=2, name="x"):
    return model_key(model or conv_model(size=size), feeds_for(size, name), threads)


def test_key_follows_structure_and_environment_not_values_or_names():
    base = key()
    assert key(conv_model(seed=1)) == base  # other weight values
    assert key(conv_model(names=("a", "b", "c")), name="a") == base  # other tensor names
    assert key(conv_model(channels=8)) != base  # initializer shape
    assert key(conv_model(kernel=1)) != base
    assert key(conv_model(stride=2)) != base  # attribute
    assert key(conv_model(size=16), size=16) != base  # input shape
    assert key(threads=1) != base


def test_key_leaves_out_constant_node_values_but_not_their_shapes():
    def constant_model(values):
        const = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(values, "w"))
        add = helper.make_node("Add", ["x", "w"], ["y"])
        graph = helper.make_graph(
            [const, add],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        )
        return helper.make_model(graph)

    feeds = {"x": np.zeros((2, 3), np.float32)}
    zeros = model_key(constant_model(np.zeros(3, np.float32)), feeds, 2)
    assert model_key(constant_model(np.ones(3, np.float32)), feeds, 2) == zeros
    assert model_key(constant_model(np.ones((2, 3), np.float32)), feeds, 2) != zeros


def test_key_changes_with_the_machine(monkeypatch):
    base = key()
    monkeypatch.setattr(latency_cache.os, "cpu_count", lambda: 12345)
    assert key() != base


def test_key_changes_with_how_pool_threads_wait(monkeypatch):
    # timings taken without spinning (before it was keyed) are not reused
    base = key()
    monkeypatch.setattr(benchmark, "DEFAULT_SPINNING", "off")
    assert key() != base


@pytest.fixture
def fake_timer(monkeypatch):
    """Replaces the benchmark; counts the models it is asked to time."""
    timed = []

    def fake(models, inputs, threads=2, warmup=5, repeats=30, min_seconds=0.0):
        timed.extend(models)
        return {name: {"median_ms": 1.0 + len(timed), "runs": repeats} for name in models}

    monkeypatch.setattr(benchmark, "benchmark_models", fake)
    return timed


def test_second_call_is_a_hit_and_persists_across_instances(cache_dir, fake_timer):
    first = time_subgraph(conv_model(), feeds_for(), 2, LatencyCache(cache_dir))
    assert len(fake_timer) == 1
    cache = LatencyCache(cache_dir)  # a new process's view: only the file
    assert time_subgraph(conv_model(seed=5), feeds_for(), 2, cache) == first
    assert len(fake_timer) == 1
    time_subgraph(conv_model(), feeds_for(), 1, cache)  # other thread count: a miss
    assert len(fake_timer) == 2
    assert (cache_dir / latency_cache.FILE_NAME).exists()


def test_a_stored_timing_with_fewer_runs_is_timed_again(cache_dir, fake_timer):
    cache = LatencyCache(cache_dir)
    cache.put(key(), Timing(9.0, runs=3))
    assert time_subgraph(conv_model(), feeds_for(), 2, cache) != 9.0
    assert len(fake_timer) == 1


def test_default_cache_uses_the_environment_folder(cache_dir, fake_timer):
    time_subgraph(conv_model(), feeds_for())
    assert latency_cache.default_cache().folder == cache_dir
    assert LatencyCache(cache_dir).get(key()) is not None


def test_compare_layer_times_only_what_the_cache_lacks(cache_dir, fake_timer):
    model = conv_model()
    node = model.graph.node[0]
    constants = {"w": numpy_helper.to_array(model.graph.initializer[0])}
    layer = SimpleNamespace(node=node, input_shape=[1, 3, 8, 8])
    pointwise = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w1")
    rewrite = SimpleNamespace(
        nodes=[helper.make_node("Conv", ["x", "w1"], ["y"])], initializers=[pointwise]
    )
    timing = layer_timing.compare_layer(constants, layer, rewrite, threads=2)
    assert set(timing) == {"original_ms", "rewritten_ms", "speedup"}
    assert timing["speedup"] == pytest.approx(timing["original_ms"] / timing["rewritten_ms"], 1e-3)
    assert fake_timer == ["original", "rewritten"]  # timed together, interleaved
    other = SimpleNamespace(
        nodes=[helper.make_node("Conv", ["x", "w1"], ["y"], strides=[2, 2])],
        initializers=[pointwise],
    )
    layer_timing.compare_layer(constants, layer, other, threads=2)
    assert fake_timer == ["original", "rewritten", "rewritten"]  # the original was a hit
    assert layer_timing.compare_layer(constants, layer, rewrite, threads=2) == timing


def test_prepared_timings_are_keyed_apart_and_prepare_runs_only_on_a_miss(cache_dir, fake_timer):
    """int8 timings: the model is quantized (here: a stand-in) only when the cache lacks it,
    keyed by the float model and the variant, apart from the float model's own timing."""
    prepared = []

    def prepare(model):
        prepared.append(model)
        return model

    cache = LatencyCache(cache_dir)
    plain = time_subgraph(conv_model(), feeds_for(), 2, cache)
    feeds = feeds_for()
    times = latency_cache.time_subgraphs(
        {"m": conv_model()}, feeds, 2, cache, prepare=prepare, variant="int8"
    )
    assert times["m"] != plain and len(prepared) == 1 and len(fake_timer) == 2
    again = latency_cache.time_subgraphs(
        {"m": conv_model(seed=3)}, feeds, 2, LatencyCache(cache_dir), prepare=prepare,
        variant="int8",
    )  # fmt: skip
    assert again == times and len(prepared) == 1 and len(fake_timer) == 2
    assert model_key(conv_model(), feeds, 2) == key()  # plain keys are what they were


def test_unusable_folder_warns_once_and_times_uncached(tmp_path, fake_timer, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    cache = LatencyCache(blocker / "cache")
    with caplog.at_level(logging.WARNING, logger="onnxcompress.auto.latency_cache"):
        first = time_subgraph(conv_model(), feeds_for(), 2, cache)
        time_subgraph(conv_model(kernel=1), feeds_for(), 2, cache)
        assert time_subgraph(conv_model(), feeds_for(), 2, cache) == first  # in-process hit
    assert len(fake_timer) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "not usable" in warnings[0].getMessage()
    assert LatencyCache(blocker / "cache").get(key()) is None


def test_real_timing_of_a_small_model(cache_dir):
    cache = LatencyCache(cache_dir)
    median = time_subgraph(conv_model(), feeds_for(), 1, cache)
    assert 0 < median < 1000
    assert cache.get(key(threads=1)).runs >= layer_timing.REPEATS


def _write_many(folder, worker, count):
    cache = LatencyCache(folder)
    for i in range(count):
        cache.put(f"{worker}-{i}", Timing(float(i), runs=worker + 1))
        cache.put(f"shared-{i}", Timing(float(i), runs=worker + 1))


def test_concurrent_writers_lose_nothing(cache_dir):
    count = 150
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(cache_dir, w, count)) for w in (0, 1)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    cache = LatencyCache(cache_dir)
    for worker in (0, 1):
        for i in range(count):
            assert cache.get(f"{worker}-{i}") == Timing(float(i), runs=worker + 1)
    for i in range(count):
        assert cache.get(f"shared-{i}").median_ms == float(i)
        assert cache.get(f"shared-{i}").runs in (1, 2)
