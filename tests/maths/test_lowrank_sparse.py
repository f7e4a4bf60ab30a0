"""lowrank_sparse: exact recovery of W = L + S at the true budgets (weight-only, data, robust
PCA start, group sparsity), objectives that never increase, and the projections."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.maths import lowrank_sparse as ls

N, D, RANK, KEEP = 30, 40, 3, 30


def _low_rank(rng, n=N, d=D, rank=RANK) -> np.ndarray:
    return rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))


def _spikes(rng, n=N, d=D, keep=KEEP) -> np.ndarray:
    """`keep` entries of magnitude 5–10 at random places: well separated from L's scale."""
    sparse = np.zeros(n * d)
    where = rng.choice(n * d, keep, replace=False)
    sparse[where] = rng.choice([-1.0, 1.0], keep) * (5 + 5 * rng.random(keep))
    return sparse.reshape(n, d)


def _moment(rng, d=D, samples=500) -> np.ndarray:
    """Second moment of anisotropic, correlated inputs (scales 0.2–3, a random mixing)."""
    x = rng.standard_normal((d, samples)) * rng.uniform(0.2, 3.0, (d, 1))
    x = (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)) @ x
    return x @ x.T / samples


def _zero_start(n=N, d=D, rank=RANK) -> ls.Split:
    return ls.Split(np.zeros((n, rank)), np.zeros((rank, d)), np.zeros((n, d)))


def _assert_monotone(objective: list[float]) -> None:
    values = np.array(objective)
    slack = 1e-9 * values[:-1] + 1e-12 * values[0]
    assert np.all(np.diff(values) <= slack), values


def _assert_recovers(result: ls.Split, low: np.ndarray, sparse: np.ndarray) -> None:
    scale = np.abs(low).max()
    np.testing.assert_allclose(result.sparse, sparse, atol=1e-6 * scale)
    np.testing.assert_allclose(result.low_rank, low, atol=1e-6 * scale)
    assert np.count_nonzero(result.sparse) == np.count_nonzero(sparse)
    assert np.linalg.matrix_rank(result.low_rank, tol=1e-8 * scale) == RANK


def test_weight_only_recovers_exact_low_rank_plus_sparse():
    rng = np.random.default_rng(0)
    low, sparse = _low_rank(rng), _spikes(rng)
    result = ls.split(low + sparse, RANK, KEEP)
    _assert_recovers(result, low, sparse)
    assert ls.relative_error(low + sparse, result) < 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_solver_keeps_the_exact_split(seed):
    """Default start (the weight-only split), a correlated, anisotropic input moment: the data
    iterations stay on the exact L and S."""
    rng = np.random.default_rng(seed)
    low, sparse = _low_rank(rng), _spikes(rng)
    _assert_recovers(ls.split(low + sparse, RANK, KEEP, moment=_moment(rng)), low, sparse)


def test_linear_solver_recovers_from_scratch():
    """The data solver alone from a zero start. Not guaranteed (the problem is non-convex):
    with this diagonal moment it recovers on 5 of seeds 1–7 (1 and 5 stall); seed 2 here."""
    rng = np.random.default_rng(2)
    low, sparse = _low_rank(rng), _spikes(rng)
    moment = np.diag(np.diag(_moment(rng)))
    result = ls.split(low + sparse, RANK, KEEP, moment=moment, start=_zero_start())
    _assert_recovers(result, low, sparse)


def test_linear_solver_exact_on_the_data_where_weight_only_is_not():
    """W = L + S + E with E in the null space of the inputs (they span 30 of 40 dimensions):
    the outputs are exactly (L + S)·x. The data solver finds an exact split on the data (up
    to the whitening's 1e-4 ridge); the weight-only split, fitting E too, does not."""
    rng = np.random.default_rng(7)
    basis = np.linalg.qr(rng.standard_normal((D, 30)))[0]
    x = basis @ rng.standard_normal((30, 400))
    moment = x @ x.T / 400
    weight = (
        _low_rank(rng)
        + _spikes(rng)
        + 3 * rng.standard_normal((N, D)) @ (np.eye(D) - basis @ basis.T)
    )
    data = ls.split(weight, RANK, KEEP, moment=moment)
    alone = ls.split(weight, RANK, KEEP)
    assert ls.relative_error(weight, data, moment) < 0.02
    assert ls.relative_error(weight, alone, moment) > 0.2


def test_robust_pca_start_then_split_recovers():
    rng = np.random.default_rng(2)
    low, sparse = _low_rank(rng), _spikes(rng)
    start = ls.robust_pca_start(low + sparse, RANK, KEEP)
    assert np.count_nonzero(start.sparse) <= KEEP
    _assert_recovers(ls.split(low + sparse, RANK, KEEP, start=start), low, sparse)


def test_group_split_recovers_whole_channels():
    """S nonzero on 2 of 10 input channels (4 columns each): L + S = W and the kept channels
    are the true ones (S itself is not identifiable on kept columns: L's row space there is
    free, so only the sum and the support are checked)."""
    rng = np.random.default_rng(3)
    groups = ls.column_groups(10, 4)
    sparse = np.zeros((N, D))
    for channel in (3, 7):
        sparse[:, groups == channel] = 5 * rng.standard_normal((N, 4))
    weight = _low_rank(rng) + sparse
    for moment in (None, _moment(rng)):
        result = ls.split(weight, RANK, 2, groups, moment=moment, iterations=300)
        np.testing.assert_allclose(result.low_rank + result.sparse, weight, atol=1e-6)
        assert list(ls.kept_groups(result.sparse, groups, 2)) == [3, 7]


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("data", [False, True])
def test_objective_never_increases(structured, data):
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((24, 72))  # not low-rank + sparse: a real trade-off
    groups = ls.column_groups(8, 9) if structured else None
    keep = 3 if structured else 200
    moment = _moment(rng, 72) if data else None
    result = ls.split(weight, 5, keep, groups, moment=moment, iterations=40)
    assert len(result.objective) > 2
    _assert_monotone(result.objective)
    assert result.objective[-1] < result.objective[0]


def test_data_solver_beats_weight_only_on_the_data():
    rng = np.random.default_rng(5)
    weight, moment = rng.standard_normal((24, 72)), _moment(rng, 72)
    groups = ls.column_groups(8, 9)
    alone = ls.split(weight, 5, 3, groups)
    data = ls.split(weight, 5, 3, groups, moment=moment)
    assert ls.relative_error(weight, data, moment) < 0.95 * ls.relative_error(weight, alone, moment)
    assert ls.relative_error(weight, alone) <= ls.relative_error(weight, data) + 1e-12


def test_group_variant_zeroes_whole_column_groups():
    rng = np.random.default_rng(6)
    groups = ls.column_groups(8, 9)
    result = ls.split(rng.standard_normal((16, 72)), 4, 3, groups, moment=_moment(rng, 72))
    nonzero_columns = np.any(result.sparse != 0, axis=0)
    used = np.unique(groups[nonzero_columns])
    assert len(used) == 3
    for channel in range(8):  # each channel's columns are all kept or all zero
        assert len(set(nonzero_columns[groups == channel])) == 1


def test_hard_thresholds():
    matrix = np.array([[1.0, -5.0, 2.0], [0.5, 4.0, -3.0]])
    np.testing.assert_array_equal(ls.hard_threshold(matrix, 2), [[0.0, -5.0, 0.0], [0.0, 4.0, 0.0]])
    assert not ls.hard_threshold(matrix, 0).any()
    groups = np.array([0, 1, 1])
    np.testing.assert_array_equal(
        ls.group_hard_threshold(matrix, groups, 1), [[0.0, -5.0, 2.0], [0.0, 4.0, -3.0]]
    )


def test_rank_out_of_range_is_refused():
    with pytest.raises(ValueError, match="rank"):
        ls.split(np.ones((3, 4)), 4, 1)


def test_relu_admm_decreases_relu_objective():
    """On this fixture the ADMM's ReLU objective falls at every iteration (within 1e-6,
    relative; ρ = 3: ρ = 1 oscillated) and ends below the linear solver's."""
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((24, 72)) / np.sqrt(72)
    x = rng.standard_normal((72, 3000)) * rng.uniform(0.3, 2.0, (72, 1))
    groups = ls.column_groups(8, 9)
    linear = ls.split(weight, 4, 3, groups, moment=x @ x.T / 3000)
    result = ls.split_relu_admm(weight, x, 4, 3, groups, start=linear)
    values = np.array(result.objective)
    assert len(values) == ls.ADMM_ITERATIONS + 1
    assert np.all(np.diff(values) <= 1e-6 * values[:-1]), values
    assert ls.relu_error(weight, result, x) < ls.relu_error(weight, linear, x)
    assert len(np.unique(groups[np.any(result.sparse != 0, axis=0)])) <= 3


def test_relu_prox_is_the_elementwise_minimiser():
    rng = np.random.default_rng(10)
    target = np.maximum(rng.standard_normal(200), 0)
    v = 2 * rng.standard_normal(200)
    z = ls._relu_prox(target, v, 3.0)
    grid = np.linspace(-8, 8, 16001)[:, None]
    cost = 0.5 * (target - np.maximum(grid, 0)) ** 2 + 1.5 * (grid - v) ** 2
    best = cost.min(axis=0)
    mine = 0.5 * (target - np.maximum(z, 0)) ** 2 + 1.5 * (z - v) ** 2
    assert np.all(mine <= best + 1e-9)
