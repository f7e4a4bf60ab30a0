"""ReLU-aware least squares: the objective never increases across kept iterates, and where a
linear fit cannot match every output, fitting relu(ŷ) to relu(y) beats least squares on it."""

from __future__ import annotations

import numpy as np

from onnxcompress.maths.relu_fit import relu_aware_fit, relu_objective


def _least_squares(x, y):
    design = np.hstack([x, np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    return solution[:-1].T, solution[-1]


def _rows(seed: int, rows: int = 4000, k: int = 12, n: int = 6):
    """Pre-activations from 2k features of which the fit sees k: it cannot match them all."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((rows, 2 * k))
    y = hidden @ rng.standard_normal((2 * k, n)) - 1.0  # mostly negative: the ReLU drops much
    return hidden[:, :k], y


def test_the_objective_falls_at_every_kept_iterate_and_ends_below_least_squares():
    x, y = _rows(0)
    start = _least_squares(x, y)
    fit = relu_aware_fit(x, y, *start, iterations=20)
    assert len(fit.objectives) > 2
    assert all(b < a for a, b in zip(fit.objectives, fit.objectives[1:], strict=False))
    assert fit.objectives[0] == relu_objective(x, y, *start)
    assert fit.objectives[-1] < 0.95 * fit.objectives[0]
    assert np.isclose(fit.objectives[-1], relu_objective(x, y, fit.projection, fit.bias))


def test_it_generalises_to_rows_it_did_not_see():
    x, y = _rows(1, rows=8000)
    seen, unseen = slice(0, 6000), slice(6000, None)
    start = _least_squares(x[seen], y[seen])
    fit = relu_aware_fit(x[seen], y[seen], *start)
    before = relu_objective(x[unseen], y[unseen], *start)
    assert relu_objective(x[unseen], y[unseen], fit.projection, fit.bias) < 0.95 * before


def test_an_exact_fit_stays_where_it_is():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 5))
    weight, bias = rng.standard_normal((3, 5)), rng.standard_normal(3)
    fit = relu_aware_fit(x, x @ weight.T + bias, weight, bias)
    assert fit.objectives == [0.0]
    np.testing.assert_array_equal(fit.projection, weight)
