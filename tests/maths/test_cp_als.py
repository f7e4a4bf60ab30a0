"""The lean CP-ALS is tensorly's `parafac` (same start, updates, ridge and stopping rule)
without Khatri–Rao products: both reach the same reconstruction."""

import warnings

import numpy as np
import pytest
import tensorly as tl
from tensorly.decomposition import parafac

from onnxcompress.maths import factors as fz


def _tensorly(w: np.ndarray, rank: int, l2_reg: float) -> tuple[np.ndarray, int]:
    options = dict(
        n_iter_max=60, tol=1e-7, random_state=0, return_errors=True,
        l2_reg=l2_reg * float(np.sum(w * w)) / rank,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly pads its SVD start and says so
        try:
            cp, errors = parafac(tl.tensor(w), rank, init="svd", **options)
        except ValueError:  # too few singular vectors: tensorly wants a random start then
            cp, errors = parafac(tl.tensor(w), rank, init="random", **options)
    return tl.cp_to_tensor(cp), len(errors)


@pytest.mark.parametrize(
    "shape, rank, l2_reg",
    [
        ((24, 16, 3, 3), 8, 0.0),  # SVD start, every mode but the spatial ones full
        ((24, 16, 3, 3), 20, 0.01),  # rank above c: padded start, ridge
        ((40, 3, 3, 3), 32, 0.01),  # mode 0's unfolding has 27 vectors: random start
    ],
)
def test_cp_als_reconstructs_as_tensorly_parafac(shape, rank, l2_reg):
    w = np.random.default_rng(3).standard_normal(shape)
    expected, sweeps = _tensorly(w, rank, l2_reg)
    ours = fz.cp_factors(w, rank, seed=0, n_iter_max=60, tol=1e-7, l2_reg=l2_reg)
    rebuilt = fz.compose_cp(ours.first, ours.vertical, ours.horizontal, ours.last)
    assert ours.iterations == sweeps
    np.testing.assert_allclose(rebuilt, expected, rtol=1e-6, atol=1e-6 * np.abs(w).max())
