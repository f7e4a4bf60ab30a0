"""Reduced-rank regression (both factors fitted to data) and the accumulator it reads."""

import numpy as np
import pytest

from onnxcompress.maths.least_squares import LeastSquaresAccumulator
from onnxcompress.maths.reduced_rank import reduced_rank_fit


def _sums(x: np.ndarray, y: np.ndarray):
    accumulator = LeastSquaresAccumulator(x.shape[1], y.shape[1])
    accumulator.add(x, y)
    return accumulator.centred()


def _weight_space(prior: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(prior, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_a_weight_of_the_target_rank_is_recovered_from_its_outputs():
    rng = np.random.default_rng(0)
    n, k, rank = 12, 20, 4
    weight = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, k))
    x = rng.standard_normal((500, k)) * rng.uniform(0.1, 3, k) + 2.0
    _, _, gram, cross = _sums(x, x @ weight.T)
    fit = reduced_rank_fit(gram, cross, rank)
    assert fit.first.shape == (rank, k) and fit.last.shape == (n, rank)
    np.testing.assert_allclose(fit.product, weight, rtol=1e-4, atol=1e-6)


def test_data_in_a_narrow_subspace_is_fitted_better_than_by_the_weights():
    rng = np.random.default_rng(1)
    n, k, width = 16, 24, 5
    weight = rng.standard_normal((n, k))
    x = rng.standard_normal((400, width)) @ rng.standard_normal((width, k))  # rank-5 inputs
    y = x @ weight.T
    _, _, gram, cross = _sums(x, y)
    for rank in (3, 5, 8):
        data_error = np.linalg.norm(y - x @ reduced_rank_fit(gram, cross, rank).product.T)
        weight_error = np.linalg.norm(y - x @ _weight_space(weight, rank).T)
        assert data_error <= weight_error * (1 + 1e-9)
        if rank >= width:  # the subspace is narrower than the rank: the data fit is exact
            assert data_error < 1e-6 * np.linalg.norm(y) < weight_error


def test_a_strong_penalty_gives_the_weight_space_truncation():
    rng = np.random.default_rng(2)
    prior = rng.standard_normal((10, 14))
    x = rng.standard_normal((200, 14))
    _, _, gram, cross = _sums(x, x @ prior.T + rng.standard_normal((200, 10)))
    fit = reduced_rank_fit(gram, cross, 3, prior, strength=1e9 * np.trace(gram))
    np.testing.assert_allclose(fit.product, _weight_space(prior, 3), rtol=1e-5, atol=1e-6)


def test_dead_inputs_keep_the_fit_defined():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 6))
    x[:, 2] = 0.0  # a channel a ReLU always zeroes
    prior = rng.standard_normal((4, 6))
    _, _, gram, cross = _sums(x, x @ prior.T)
    fit = reduced_rank_fit(gram, cross, 4, prior, strength=0.0)
    assert np.isfinite(fit.product).all()
    np.testing.assert_allclose(x @ fit.product.T, x @ prior.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rank", [0, 7])
def test_rank_outside_the_shapes_is_refused(rank):
    with pytest.raises(ValueError, match="rank"):
        reduced_rank_fit(np.eye(6), np.ones((6, 4)), rank)


def test_merged_accumulators_equal_one_over_every_sample():
    rng = np.random.default_rng(4)
    z, y = rng.standard_normal((300, 5)) + 3, rng.standard_normal((300, 2)) - 7
    whole = LeastSquaresAccumulator(5, 2)
    whole.add(z, y)
    parts, rest = LeastSquaresAccumulator(5, 2), LeastSquaresAccumulator(5, 2)
    parts.add(z[:90], y[:90])
    rest.add(z[90:], y[90:])
    parts.merge(rest)
    empty = LeastSquaresAccumulator(5, 2)
    empty.merge(parts)
    for merged in (parts, empty):
        assert merged.count == 300
        for got, want in zip(merged.centred(), whole.centred(), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        projection, bias = rng.standard_normal((2, 5)), rng.standard_normal(2)
        assert merged.residual_sum_of_squares(projection, bias) == pytest.approx(
            float(np.sum((y - z @ projection.T - bias) ** 2)), rel=1e-9
        )
