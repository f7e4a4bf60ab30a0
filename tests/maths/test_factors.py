"""Factorization maths: exact-structure recovery, error falling with rank, refit, rank choice."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcompress.maths import btd
from onnxcompress.maths import factors as fz

# The tolerances onnx-simplifier uses for exact rewrites.
RTOL, ATOL = 1e-4, 1e-5


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def _conv2d(x: np.ndarray, weight: np.ndarray, groups: int = 1) -> np.ndarray:
    """ONNX Conv semantics (cross-correlation), stride 1, no pads: x (c, H, W) → (n, H', W')."""
    n, per_group, kh, kw = weight.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    outputs_per_group = n // groups
    return np.concatenate(
        [
            np.einsum(
                "cxyij,ncij->nxy",
                windows[g * per_group : (g + 1) * per_group],
                weight[g * outputs_per_group : (g + 1) * outputs_per_group],
            )
            for g in range(groups)
        ]
    )


def _fga_structured(n, c, kh, kw, groups, rank, seed=0):
    """A weight whose every input-channel group is exactly rank `rank`."""
    rng = _rng(seed)
    per_group = c // groups
    blocks = [
        (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, per_group * kh * kw)))
        for _ in range(groups)
    ]
    return np.concatenate([b.reshape(n, per_group, kh, kw) for b in blocks], axis=1)


def _btd_structured(n, c, kh, kw, groups, rank, inner, seed=0):
    """Σ_g P_g · G_g · A_gᵀ with an orthonormal channel mixing A (the form fga_btd fits)."""
    rng = _rng(seed)
    pointwise = rng.standard_normal((n, groups, rank))
    cores = rng.standard_normal((groups, rank, inner, kh * kw))
    mixing = np.linalg.qr(rng.standard_normal((c, groups * inner)))[0].reshape(c, groups, inner)
    return np.einsum("ngr,grqs,cgq->ncs", pointwise, cores, mixing).reshape(n, c, kh, kw)


# --- exact structure is recovered --------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, kh, kw, groups, rank",
    [(8, 6, 3, 5, 2, 2), (12, 8, 1, 3, 4, 1), (16, 12, 3, 3, 3, 4), (6, 4, 3, 5, 1, 3)],
)
def test_fga_recovers_exact_group_rank(n, c, kh, kw, groups, rank):
    weight = _fga_structured(n, c, kh, kw, groups, rank)
    grouped, pointwise = fz.fga_factors(weight, groups, rank)
    assert grouped.shape == (groups * rank, c // groups, kh, kw)
    assert pointwise.shape == (n, groups * rank, 1, 1)
    np.testing.assert_allclose(fz.compose_fga(grouped, pointwise, groups), weight, RTOL, ATOL)


def test_fga_factors_compose_as_convolutions():
    weight = _fga_structured(8, 6, 3, 5, groups=3, rank=2)
    x = _rng(1).standard_normal((6, 9, 11))
    grouped, pointwise = fz.fga_factors(weight, 3, 2)
    factored = _conv2d(_conv2d(x, grouped, groups=3), pointwise)
    np.testing.assert_allclose(factored, _conv2d(x, weight), RTOL, ATOL)


@pytest.mark.parametrize(
    "n, c, kh, kw, rank_in, rank_out", [(10, 8, 3, 5, 3, 4), (6, 9, 1, 3, 2, 5), (8, 8, 3, 3, 8, 8)]
)
def test_tucker2_recovers_exact_multilinear_rank(n, c, kh, kw, rank_in, rank_out):
    rng = _rng(2)
    core = rng.standard_normal((rank_out, rank_in, kh, kw))
    weight = np.einsum(
        "no,oiab,ic->ncab",
        rng.standard_normal((n, rank_out)),
        core,
        rng.standard_normal((rank_in, c)),
    )
    first, core, last = fz.tucker2_factors(weight, rank_in, rank_out)
    assert (first.shape, core.shape, last.shape) == (
        (rank_in, c, 1, 1),
        (rank_out, rank_in, kh, kw),
        (n, rank_out, 1, 1),
    )
    np.testing.assert_allclose(fz.compose_tucker2(first, core, last), weight, RTOL, ATOL)
    x = rng.standard_normal((c, 7, 8))
    factored = _conv2d(_conv2d(_conv2d(x, first), core), last)
    np.testing.assert_allclose(factored, _conv2d(x, weight), RTOL, ATOL)


def _cp_weight(n, c, kh, kw, rank, seed=3):
    rng = _rng(seed)
    return np.einsum("nr,cr,ir,jr->ncij", *(rng.standard_normal((d, rank)) for d in (n, c, kh, kw)))


@pytest.mark.parametrize(
    "n, c, kh, kw, rank", [(8, 6, 3, 3, 4), (16, 12, 3, 5, 6), (10, 8, 1, 3, 3)]
)
def test_cp_recovers_exact_cp_rank(n, c, kh, kw, rank):
    weight = _cp_weight(n, c, kh, kw, rank)
    cp = fz.cp_factors(weight, rank, n_iter_max=1000, tol=1e-10)
    assert cp.first.shape == (rank, c, 1, 1) and cp.last.shape == (n, rank, 1, 1)
    assert cp.vertical.shape == (rank, 1, kh, 1) and cp.horizontal.shape == (rank, 1, 1, kw)
    assert cp.converged
    # ALS is a local method with no guarantee of reaching the exact decomposition (these cases
    # reach ~1e-8), so the bound is looser than for the SVD-based forms.
    assert cp.relative_error < 1e-3
    composed = fz.compose_cp(cp.first, cp.vertical, cp.horizontal, cp.last)
    assert _relative_error(composed, weight) == pytest.approx(cp.relative_error, abs=1e-9)
    x = _rng(4).standard_normal((c, 6, 7))
    middle = _conv2d(_conv2d(_conv2d(x, cp.first), cp.vertical, rank), cp.horizontal, rank)
    factored = _conv2d(middle, cp.last)
    assert _relative_error(factored, _conv2d(x, weight)) < 1e-3


def test_cp_is_reproducible_and_reports_convergence():
    weight = _cp_weight(6, 5, 3, 3, 8)  # R above every mode size: the SVD init gets padded
    first = fz.cp_factors(weight, 8, seed=7, n_iter_max=2000, tol=1e-10)
    again = fz.cp_factors(weight, 8, seed=7, n_iter_max=2000, tol=1e-10)
    for name in ("first", "vertical", "horizontal", "last"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.converged and 1 <= first.iterations < 2000
    capped = fz.cp_factors(weight, 8, seed=7, n_iter_max=3, tol=1e-10)
    assert not capped.converged and capped.iterations == 3


def test_matrix_factors_recover_exact_rank_with_balanced_scale():
    rng = _rng(5)
    matrix = rng.standard_normal((20, 3)) @ rng.standard_normal((3, 15))
    a, b = fz.matrix_factors(matrix, 3)
    assert a.shape == (20, 3) and b.shape == (3, 15)
    np.testing.assert_allclose(a @ b, matrix, RTOL, ATOL)
    # √S on both sides: matching column/row norms.
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1))
    left, right = fz.truncated_svd(matrix, 3)
    np.testing.assert_allclose(left @ right, matrix, RTOL, ATOL)
    np.testing.assert_allclose(right @ right.T, np.eye(3), atol=1e-10)


@pytest.mark.parametrize("n, c, kh, kw, rank", [(8, 6, 3, 5, 4), (5, 4, 3, 3, 2), (6, 3, 1, 3, 2)])
def test_spatial_svd_recovers_exact_rank(n, c, kh, kw, rank):
    rng = _rng(6)
    vertical = rng.standard_normal((rank, c, kh, 1))
    horizontal = rng.standard_normal((n, rank, 1, kw))
    weight = fz.compose_spatial_svd(vertical, horizontal)
    v, h = fz.spatial_svd_factors(weight, rank)
    assert v.shape == (rank, c, kh, 1) and h.shape == (n, rank, 1, kw)
    np.testing.assert_allclose(fz.compose_spatial_svd(v, h), weight, RTOL, ATOL)
    x = rng.standard_normal((c, 7, 9))
    np.testing.assert_allclose(_conv2d(_conv2d(x, v), h), _conv2d(x, weight), RTOL, ATOL)


@pytest.mark.parametrize(
    "n, c, kh, kw, groups, rank, inner",
    [
        (12, 8, 3, 3, 2, 3, 2),
        (16, 12, 3, 5, 3, 2, 2),
        (24, 16, 3, 3, 2, 4, 4),
        (16, 16, 3, 3, 4, 2, 4),
    ],
)
def test_fga_btd_recovers_exact_block_terms(n, c, kh, kw, groups, rank, inner):
    weight = _btd_structured(n, c, kh, kw, groups, rank, inner)
    leading, grouped, pointwise = btd.fga_btd_factors(
        weight, groups, rank, inner, iterations=500, tol=1e-12
    )
    assert leading.shape == (groups * inner, c, 1, 1)
    assert grouped.shape == (groups * rank, inner, kh, kw)
    assert pointwise.shape == (n, groups * rank, 1, 1)
    composed = btd.compose_fga_btd(leading, grouped, pointwise, groups)
    np.testing.assert_allclose(composed, weight, RTOL, ATOL)
    x = _rng(7).standard_normal((c, 6, 8))
    factored = _conv2d(_conv2d(_conv2d(x, leading), grouped, groups), pointwise)
    np.testing.assert_allclose(factored, _conv2d(x, weight), RTOL, ATOL)


# --- special cases and orderings ----------------------------------------------------------


def test_fga_with_one_group_is_plain_channel_svd():
    weight = _rng(8).standard_normal((10, 6, 3, 3))
    left, right = fz.truncated_svd(weight.reshape(10, -1), 4)
    expected = (left @ right).reshape(weight.shape)
    np.testing.assert_allclose(fz.compose_fga(*fz.fga_factors(weight, 1, 4), 1), expected, 1e-10)


def test_fga_with_groups_equal_channels_recovers_depthwise_separable():
    rng = _rng(9)
    depthwise = rng.standard_normal((5, 1, 3, 3))
    pointwise_true = rng.standard_normal((7, 5, 1, 1))
    weight = fz.compose_fga(depthwise, pointwise_true, groups=5)
    grouped, pointwise = fz.fga_factors(weight, groups=5, rank=1)
    assert grouped.shape == (5, 1, 3, 3) and pointwise.shape == (7, 5, 1, 1)
    np.testing.assert_allclose(fz.compose_fga(grouped, pointwise, 5), weight, RTOL, ATOL)


def test_errors_do_not_rise_with_rank():
    weight = _rng(10).standard_normal((8, 12, 3, 3))
    matrix = weight.reshape(8, -1)

    def errors(compose, ranks):
        return [_relative_error(compose(r), weight) for r in ranks]

    curves = {
        "fga": errors(lambda r: fz.compose_fga(*fz.fga_factors(weight, 2, r), 2), range(1, 9)),
        "tucker2": errors(
            lambda r: fz.compose_tucker2(*fz.tucker2_factors(weight, r, r)), [1, 2, 4, 6, 8]
        ),
        "svd": errors(
            lambda r: np.matmul(*fz.truncated_svd(matrix, r)).reshape(weight.shape), range(1, 9)
        ),
        "spatial": errors(
            lambda r: fz.compose_spatial_svd(*fz.spatial_svd_factors(weight, r)), range(1, 25, 3)
        ),
    }
    for name, curve in curves.items():
        assert all(b <= a + 1e-9 for a, b in zip(curve, curve[1:], strict=False)), (name, curve)
        assert curve[-1] < curve[0], name
    assert curves["fga"][-1] < 1e-10  # rank 8 = n: exact


def test_fga_btd_is_never_worse_than_fga():
    # With c′ = c/g one of its starts is the FGA solution and every ALS step is exact.
    weight = _rng(11).standard_normal((12, 8, 3, 3))
    for groups, rank in [(2, 3), (4, 2)]:
        fga = _relative_error(fz.compose_fga(*fz.fga_factors(weight, groups, rank), groups), weight)
        block_terms = _relative_error(
            btd.compose_fga_btd(*btd.fga_btd_factors(weight, groups, rank), groups), weight
        )
        assert block_terms <= fga + 1e-9


def test_dtypes_follow_the_input():
    weight = _rng(12).standard_normal((6, 4, 3, 3))
    assert all(f.dtype == np.float32 for f in fz.fga_factors(weight.astype(np.float32), 2, 2))
    assert all(f.dtype == np.float64 for f in fz.tucker2_factors(weight, 2, 2))
    assert all(f.dtype == np.float32 for f in fz.spatial_svd_factors(weight.astype(np.int32), 2))
    assert fz.cp_factors(weight.astype(np.float32), 2, n_iter_max=5).last.dtype == np.float32


@pytest.mark.parametrize(
    "call",
    [
        lambda w: fz.fga_factors(w, 3, 1),  # 4 channels not divisible by 3
        lambda w: fz.fga_factors(w, 2, 7),  # rank > n
        lambda w: fz.fga_factors(w, 2, 0),
        lambda w: fz.tucker2_factors(w, 5, 2),  # rank_in > c
        lambda w: fz.spatial_svd_factors(w, 13),  # > min(c·kh, n·kw)
        lambda w: btd.fga_btd_factors(w, 2, 1, inner_channels=3),  # g·c′ > c
        lambda w: fz.fga_factors(w[:, :, 0], 1, 1),  # not a 2-D conv weight
        lambda w: fz.truncated_svd(w.reshape(6, -1), 7),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(np.ones((6, 4, 3, 3)))


def test_lazy_reexports():
    from onnxcompress.maths.btd import compose_fga_btd, fga_btd_factors  # noqa: F401

    with pytest.raises(AttributeError):
        fz.no_such_function  # noqa: B018


# --- costs -------------------------------------------------------------------------------


def test_macs_per_pixel_equal_factor_parameter_counts():
    # At stride 1 every weight is used once per output pixel, so MACs/pixel = parameters.
    n, c, kh, kw = 12, 8, 3, 5
    weight = _rng(13).standard_normal((n, c, kh, kw))
    assert fz.conv_macs_per_pixel(n, c, kh, kw) == weight.size
    assert fz.conv_macs_per_pixel(n, c, kh, kw, groups=4) == weight.size // 4

    def size(arrays):
        return sum(a.size for a in arrays)

    assert fz.fga_macs_per_pixel(n, c, kh, kw, 2, 3) == size(fz.fga_factors(weight, 2, 3))
    block_terms = btd.fga_btd_factors(weight, 2, 3, inner_channels=3, iterations=2)
    assert fz.fga_btd_macs_per_pixel(n, c, kh, kw, 2, 3, 3) == size(block_terms)
    assert fz.tucker2_macs_per_pixel(n, c, kh, kw, 4, 5) == size(fz.tucker2_factors(weight, 4, 5))
    cp = fz.cp_factors(weight, 4, n_iter_max=2)
    assert fz.cp_macs_per_pixel(n, c, kh, kw, 4) == size(
        [cp.first, cp.vertical, cp.horizontal, cp.last]
    )
    assert fz.spatial_svd_macs(n, c, kh, kw, 5) == size(fz.spatial_svd_factors(weight, 5))
    assert fz.matrix_macs_per_row(20, 30) == 600 and fz.matrix_macs_per_row(20, 30, 4) == 200
    # The FGA paper's cost ratio: r/n + g·r/(c·k²).
    ratio = fz.fga_macs_per_pixel(64, 64, 3, 3, 4, 8) / fz.conv_macs_per_pixel(64, 64, 3, 3)
    assert ratio == pytest.approx(8 / 64 + 4 * 8 / (64 * 9))


# --- rank choice -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        ((1,), 16),
        ((0,), 16),
        ((16,), 16),
        ((17,), 32),
        ((17, 16, 20), 20),  # the cap wins even when unaligned
        ((5, 16, 8), 8),  # maximum below align
        ((33, 8, 64), 40),
        ((100, 1), 100),
    ],
)
def test_align_rank(args, expected):
    assert fz.align_rank(*args) == expected


def test_align_rank_rejects_bad_alignment():
    with pytest.raises(ValueError):
        fz.align_rank(4, align=0)
    with pytest.raises(ValueError):
        fz.align_rank(4, maximum=0)


def test_rank_for_energy():
    sigma = np.array([3.0, 4.0, 0.0])  # unsorted on purpose; energies 16 and 9 of 25
    assert fz.rank_for_energy(sigma, 0.64) == 1
    assert fz.rank_for_energy(sigma, 0.65) == 2
    assert fz.rank_for_energy(sigma, 1.0) == 2  # zero singular values are never needed
    assert fz.rank_for_energy(np.zeros(4), 0.9) == 0
    assert fz.rank_for_energy(np.array([]), 0.9) == 0
    for energy in (0.0, 1.5):
        with pytest.raises(ValueError):
            fz.rank_for_energy(sigma, energy)


@pytest.mark.parametrize("shape, rank", [((40, 60), 5), ((60, 40), 5), ((64, 288), 12)])
def test_vbmf_recovers_rank_under_small_noise(shape, rank):
    rng = _rng(14)
    low_rank = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    assert fz.vbmf_rank(low_rank + 0.05 * rng.standard_normal(shape)) == rank
    assert fz.vbmf_rank(low_rank) == rank  # noiseless: σ² pinned at its lower bound


def test_vbmf_edge_cases():
    assert fz.vbmf_rank(np.zeros((5, 8))) == 0
    # Pure noise. EVBMF's threshold sits just above the noise edge for square matrices, so it
    # occasionally keeps one direction (seed 15 here; the published reference code agrees).
    assert fz.vbmf_rank(_rng(0).standard_normal((50, 50))) == 0
    with pytest.raises(ValueError):
        fz.vbmf_rank(np.ones(5))


# --- calibration least squares -------------------------------------------------------------


def _regression_data(samples=200, k=6, n=4, noise=0.0, offset=0.0, seed=16):
    rng = _rng(seed)
    inputs = rng.standard_normal((samples, k)) + offset
    projection, bias = rng.standard_normal((n, k)), rng.standard_normal(n)
    targets = inputs @ projection.T + bias + noise * rng.standard_normal((samples, n))
    return inputs, targets, projection, bias


def test_refit_recovers_known_projection_and_bias():
    inputs, targets, projection, bias = _regression_data()
    p, b = fz.refit_least_squares(inputs, targets, ridge=0.0)
    np.testing.assert_allclose(p, projection, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(b, bias, rtol=1e-9, atol=1e-9)
    p, b = fz.refit_least_squares(inputs.astype(np.float32), targets.astype(np.float32))
    assert p.dtype == np.float32 and b.shape == (4,)
    np.testing.assert_allclose(p, projection, RTOL, 1e-4)
    np.testing.assert_allclose(b, bias, RTOL, 1e-4)


def test_streaming_accumulator_equals_one_shot():
    # A large common offset checks that the accumulated sums are centred without cancellation.
    inputs, targets, _, _ = _regression_data(samples=300, noise=0.1, offset=1e4)
    accumulator = fz.LeastSquaresAccumulator(6, 4)
    for batch in np.array_split(np.arange(300), 3):
        accumulator.add(inputs[batch], targets[batch])
    streamed = accumulator.solve()
    one_shot = fz.refit_least_squares(inputs, targets)
    for a, b in zip(streamed, one_shot, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    p, b = streamed
    direct = float(np.sum((targets - inputs @ p.T - b) ** 2))
    assert accumulator.residual_sum_of_squares(p, b) == pytest.approx(direct, rel=1e-6)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 4), noise=st.floats(0.0, 1.0))
def test_refit_never_increases_the_error(seed, rank, noise):
    inputs, targets, projection, bias = _regression_data(noise=noise, seed=seed)
    # An initial factor as a decomposition would give it: a truncation of the true projection
    # (rank 4 is the full rank, so the initial factor can already be optimal).
    initial = np.matmul(*fz.truncated_svd(projection, rank))

    def error(p, b):
        return float(np.sum((targets - inputs @ p.T - b) ** 2))

    # Without ridge the refit is the least-squares minimiser: never worse, up to rounding.
    tiny = 1e-12 * float(np.sum((targets - targets.mean(axis=0)) ** 2))
    assert error(*fz.refit_least_squares(inputs, targets, ridge=0.0)) <= error(initial, bias) + tiny
    # With ridge it minimises error + λ‖P‖², so it can lose at most λ‖P₀‖² to the initial P₀.
    ridge = 1e-6
    centred = inputs - inputs.mean(axis=0)
    lam = ridge * np.trace(centred.T @ centred) / inputs.shape[1]
    bound = error(initial, bias) + lam * float(np.sum(initial**2)) + tiny
    assert error(*fz.refit_least_squares(inputs, targets, ridge=ridge)) <= bound


def test_accumulator_rejects_bad_input():
    accumulator = fz.LeastSquaresAccumulator(3, 2)
    with pytest.raises(ValueError):
        accumulator.solve()
    with pytest.raises(ValueError):
        accumulator.add(np.ones((4, 3)), np.ones((5, 2)))
    with pytest.raises(ValueError):
        accumulator.add(np.ones((4, 2)), np.ones((4, 2)))


def test_refit_handles_dependent_inputs_without_ridge():
    inputs, targets, _, _ = _regression_data(k=3)
    duplicated = np.hstack([inputs, inputs[:, :1]])  # a repeated channel: ZᵀZ is singular
    p, b = fz.refit_least_squares(duplicated, targets, ridge=0.0)
    np.testing.assert_allclose(duplicated @ p.T + b, targets, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(
    "align, width, expected",
    [(16, 64, 16), (16, 17, 16), (16, 16, 8), (16, 9, 8), (16, 8, 4), (8, 2, 1), (16, 1, 1)],
)
def test_narrow_layers_shrink_the_alignment(align, width, expected):
    from onnxcompress.maths.ranks import layer_align

    assert layer_align(align, width) == expected


def test_aligned_ranks_always_offer_a_rank_below_the_width():
    from onnxcompress.maths.ranks import aligned_ranks

    assert aligned_ranks(16, 64) == [16, 32, 48]
    assert aligned_ranks(16, 16) == [8]  # align 16 alone would leave a 16-wide layer nothing
    assert aligned_ranks(16, 16, include_maximum=True) == [8, 16]
    assert aligned_ranks(16, 20) == [16]
