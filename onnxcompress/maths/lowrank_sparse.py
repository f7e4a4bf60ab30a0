"""Low-rank + sparse splits of a weight matrix, W ≈ L + S (methods.md §3), as pure numpy.

W is the layer's weight as a matrix n × d (a conv's unfolded to n × c·kh·kw, a linear layer's
as outputs × inputs), acting on column vectors x (patches or features): y = W x. The split
minimises the output error on inputs with second moment C = E[x xᵀ],

    f(L, S) = tr((W − L − S) C (W − L − S)ᵀ) = ‖(W − L − S)·T‖²,   C = T Tᵀ,

subject to rank(L) ≤ r and a sparsity budget on S: at most `keep` nonzero entries
(unstructured), or at most `keep` nonzero column *groups* (structured: with `groups` giving
each column its group, e.g. its input channel, whole input channels of S are zero).
C = I (no data) is the weight-only problem.

Alternating minimisation (Yu et al., CVPR 2017): the L step is reduced-rank regression, exact:
L = [(W − S)·T]_r · T⁻¹ (truncated SVD in the whitened coordinates); the S step is, for
C = I, the exact minimiser HT(W − L) (hard thresholding), else hard thresholding pursuit: a
projected gradient step with step 1/λmax(C) (it minimises a majorizer of f over the sparse
set, so f does not increase) picks a support, S is refitted exactly on it by least squares,
and the fit on the support of HT(W − L) replaces it when lower. So f never increases across
iterations, and the data solver started from the weight-only split can only do better than
it on the data. (T is the Cholesky factor of C plus a 1e-4 relative ridge, as
activation_scale.whitening; f is measured with that ridge.) The problem is non-convex: the
splits are local minima, exact only in favourable cases (the tests' well-separated ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

from onnxcompress.maths.whitening import whitening

ITERATIONS = 30
INNER_STEPS = 3  # hard-thresholding pursuit steps per S update when C ≠ I
MAX_SUPPORT = 512  # per-row exact fits above this support size are skipped (cost)
TOLERANCE = 1e-9  # stop when f falls by less than this, relative
EXACT = 1e-20  # or when f is this small relative to its start: an exact split
ADMM_RHO = 3.0  # penalty of the ReLU ADMM; see docs/decisions.md#admm_rho
ADMM_ITERATIONS = 20
ADMM_INNER = 10  # alternating iterations of each warm-started split inside the ADMM


@dataclass
class Split:
    """W ≈ left @ right + sparse; `objective` holds f after each iteration (first: start)."""

    left: np.ndarray  # n × r
    right: np.ndarray  # r × d
    sparse: np.ndarray  # n × d
    objective: list[float] = field(default_factory=list)

    @property
    def low_rank(self) -> np.ndarray:
        return self.left @ self.right


def hard_threshold(matrix: np.ndarray, keep: int) -> np.ndarray:
    """`matrix` with all but its `keep` largest-magnitude entries set to zero."""
    flat = matrix.ravel()
    out = np.zeros_like(flat)
    if keep > 0:
        top = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep :]
        out[top] = flat[top]
    return out.reshape(matrix.shape)


def group_hard_threshold(matrix: np.ndarray, groups: np.ndarray, keep: int) -> np.ndarray:
    """`matrix` with every column group zeroed except the `keep` of largest Frobenius norm."""
    return matrix * np.isin(groups, kept_groups(matrix, groups, keep))[None, :]


def kept_groups(matrix: np.ndarray, groups: np.ndarray, keep: int) -> np.ndarray:
    """Sorted ids of the `keep` column groups of largest norm."""
    ids = np.unique(groups)
    norms = np.array([np.sum(matrix[:, groups == g] ** 2) for g in ids])
    order = np.argsort(-norms, kind="stable")[:keep]
    return np.sort(ids[order])


def column_groups(channels: int, kernel_volume: int) -> np.ndarray:
    """Group id (input channel) of each column of a conv weight unfolded as n × (c·kh·kw)."""
    return np.repeat(np.arange(channels), kernel_volume)


def split(
    weight: np.ndarray,
    rank: int,
    keep: int,
    groups: np.ndarray | None = None,
    moment: np.ndarray | None = None,
    start: Split | None = None,
    iterations: int = ITERATIONS,
    tolerance: float = TOLERANCE,
) -> Split:
    """Alternating minimisation of f(L, S) (module docstring), float64 factors.

    `moment` None: weight-only (C = I). Starts from `start`'s S when given; otherwise the
    weight-only problem is run from two starts, S = 0 (L first: the best rank-r L) and
    S = the budgeted part of W (S first), and the better kept (either can stall in a local
    minimum the other avoids); the data problem starts from that weight-only split. Stops
    after `iterations`, or when f falls by less than `tolerance` (relative) in one."""
    w = np.asarray(weight, np.float64)
    n, d = w.shape
    if not 0 <= rank <= min(n, d):
        raise ValueError(f"rank {rank} outside [0, {min(n, d)}]")
    project = _projector(keep, groups, d)
    if start is not None:
        sparse = project(np.asarray(start.sparse, np.float64))
        return _alternate(w, rank, project, moment, sparse, iterations, tolerance)
    runs = [
        _alternate(w, rank, project, None, first, iterations, tolerance)
        for first in (np.zeros_like(w), project(w))
    ]
    best = min(runs, key=lambda run: run.objective[-1])
    if moment is None:
        return best
    return _alternate(w, rank, project, moment, best.sparse, iterations, tolerance)


def _alternate(w, rank, project, moment, sparse, iterations, tolerance) -> Split:
    t = None if moment is None else whitening(np.asarray(moment, np.float64), diagonal=False)
    moment_t = None if t is None else t @ t.T  # C with the ridge the whitening added
    step = 1.0 if t is None else 1.0 / float(np.linalg.norm(t, 2) ** 2)  # 1 / λmax(C)
    left, right = _reduced_rank(w - sparse, rank, t)
    history = [_objective(w - left @ right - sparse, t)]
    for _ in range(iterations):
        sparse = _sparse_step(w - left @ right, sparse, project, moment_t, step)
        left, right = _reduced_rank(w - sparse, rank, t)
        history.append(_objective(w - left @ right - sparse, t))
        if (
            history[-2] - history[-1] <= tolerance * history[-2]
            or history[-1] <= EXACT * history[0]
        ):
            break
    return Split(left, right, sparse, history)


def relative_error(weight: np.ndarray, result: Split, moment: np.ndarray | None = None) -> float:
    """‖(W − L − S)·T‖ / ‖W·T‖ (T = I without a moment): the layer's relative output error."""
    w = np.asarray(weight, np.float64)
    t = None if moment is None else whitening(np.asarray(moment, np.float64), diagonal=False)
    total = _objective(w, t)
    return float(np.sqrt(_objective(w - result.low_rank - result.sparse, t) / max(total, 1e-300)))


def robust_pca_start(weight: np.ndarray, rank: int, keep: int, groups=None) -> Split:
    """tensorly's robust PCA of W (principal component pursuit) projected onto the budgets:
    S = the budgeted part of its sparse component, L = the best rank-r fit of W − S."""
    from tensorly.decomposition import robust_pca

    w = np.asarray(weight, np.float64)
    # The standard weight λ = 1/√max(n, d) (Candès et al. 2011) on the sparse term.
    _, sparse = robust_pca(w, reg_E=1.0 / np.sqrt(max(w.shape)), verbose=0)
    sparse = _projector(keep, groups, w.shape[1])(np.asarray(sparse, np.float64))
    left, right = _reduced_rank(w - sparse, rank, None)
    return Split(left, right, sparse, [_objective(w - left @ right - sparse, None)])


def _projector(keep: int, groups: np.ndarray | None, columns: int):
    if groups is None:
        return lambda m: hard_threshold(m, keep)
    if len(groups) != columns:
        raise ValueError(f"{len(groups)} group ids for {columns} columns")
    return lambda m: group_hard_threshold(m, groups, keep)


def _sparse_step(residual, sparse, project, moment, step) -> np.ndarray:
    """S minimising ‖(R − S)·T‖² over the sparse set: exact for T = I; else hard thresholding
    pursuit (Foucart 2011): a projected gradient step (never increases the objective) picks
    a support and S is the exact least-squares fit on it (can only lower it further). The
    support of HT(R) (a Newton step: the gradient preconditioned by C⁻¹) is tried too, and the
    better of the two fits kept: the gradient alone, mixed by a correlated C, can lock onto a
    wrong support."""
    if moment is None:
        return project(residual)
    newton = _fit_on_support(residual, project(residual), moment)
    for _ in range(INNER_STEPS):
        stepped = project(sparse + step * (residual - sparse) @ moment)
        same_support = np.array_equal(stepped != 0, sparse != 0)
        sparse = _fit_on_support(residual, stepped, moment)
        if same_support:  # the fit on an unchanged support is where it was: done
            break
    return min((sparse, newton), key=lambda s: _quadratic(residual - s, moment))


def _quadratic(error: np.ndarray, moment: np.ndarray) -> float:
    return float(np.sum((error @ moment) * error))


def _fit_on_support(residual, sparse, moment) -> np.ndarray:
    """argmin ‖(R − S) T‖² with S zero where `sparse` is: row i solves S_iJ C_JJ = R_i C_:J
    on its support J (one solve for all rows when they share it, as group sparsity does).
    Rows with more than MAX_SUPPORT nonzeros are too costly to solve one by one: `sparse`
    (the gradient step's result) is kept then."""
    support = sparse != 0
    shared = bool(np.all(support == support[:1]))
    if not shared and support.sum(axis=1).max(initial=0) > MAX_SUPPORT:
        return sparse
    fitted = np.zeros_like(residual)
    target = residual @ moment
    rows = [np.arange(len(residual))] if shared else [[i] for i in range(len(residual))]
    for row in rows:
        columns = np.flatnonzero(support[row[0]])
        if columns.size:
            block = moment[np.ix_(columns, columns)]
            solved = scipy.linalg.solve(block, target[np.ix_(row, columns)].T, assume_a="pos")
            fitted[np.ix_(row, columns)] = solved.T
    return fitted


def _reduced_rank(target: np.ndarray, rank: int, t: np.ndarray | None):
    """(A, B), A @ B = argmin ‖(target − L)·T‖ over rank(L) ≤ r: [target·T]_r · T⁻¹."""
    n, d = target.shape
    if rank == 0:
        return np.zeros((n, 0)), np.zeros((0, d))
    whitened = target if t is None else target @ t
    u, s, vt = scipy.linalg.svd(whitened, full_matrices=False, lapack_driver="gesdd")
    root = np.sqrt(s[:rank])
    right = root[:, None] * vt[:rank]
    if t is not None:  # right · T⁻¹, T lower triangular
        right = scipy.linalg.solve_triangular(t, right.T, lower=True, trans="T").T
    return u[:, :rank] * root, right


def _objective(error: np.ndarray, t: np.ndarray | None) -> float:
    return float(np.sum((error if t is None else error @ t) ** 2))


def split_relu_admm(
    weight: np.ndarray,
    inputs: np.ndarray,
    rank: int,
    keep: int,
    groups: np.ndarray | None = None,
    start: Split | None = None,
    bias: np.ndarray | None = None,
    rho: float = ADMM_RHO,
    iterations: int = ADMM_ITERATIONS,
) -> Split:
    """ReLU-aware split (Ma et al., ICTAI 2019): min ½‖relu(W X + b) − relu((L + S) X + b)‖² / N
    over the same budgets (b: the layer's bias, kept), by ADMM on Z = (L + S) X + b with
    scaled dual U: Z = the closed-form ReLU prox at (L + S) X + b − U (per element, the
    better of z ≥ 0 and z < 0); L + S = the data split of the least-squares target for
    Z + U − b (warm-started); U += Z − (L + S) X − b. `inputs` is d × N (columns are
    samples). Starts from `start` or the data split; returns the iterate of least ReLU
    objective, with the objective of every iterate in `objective` (non-convex ADMM: not
    guaranteed monotone)."""
    w, x = np.asarray(weight, np.float64), np.asarray(inputs, np.float64)
    samples = x.shape[1]
    moment = x @ x.T / samples
    shift = np.zeros((len(w), 1)) if bias is None else np.asarray(bias, np.float64)[:, None]
    target = np.maximum(w @ x + shift, 0.0)
    current = start or split(w, rank, keep, groups, moment=moment)
    # Least-squares map of targets Y to matrices M with M X ≈ Y (ridge as the whitening's).
    ridge = 1e-4 * max(float(np.trace(moment)) / len(moment), 1e-30)
    solve = scipy.linalg.cho_factor(moment + ridge * np.eye(len(moment)))
    product = (current.low_rank + current.sparse) @ x + shift
    dual = np.zeros_like(target)
    history = [_relu_objective(target, product)]
    best = (history[0], current)
    for _ in range(iterations):
        z = _relu_prox(target, product - dual, rho)
        fit = scipy.linalg.cho_solve(solve, x @ (z + dual - shift).T / samples).T
        current = split(fit, rank, keep, groups, moment, current, ADMM_INNER, 1e-3)
        product = (current.low_rank + current.sparse) @ x + shift
        dual += z - product
        history.append(_relu_objective(target, product))
        if history[-1] < best[0]:
            best = (history[-1], current)
    chosen = best[1]
    return Split(chosen.left, chosen.right, chosen.sparse, history)


def relu_error(weight: np.ndarray, result: Split, inputs: np.ndarray, bias=None) -> float:
    """‖relu(W X + b) − relu((L + S) X + b)‖ / ‖relu(W X + b)‖."""
    x = np.asarray(inputs, np.float64)
    shift = 0.0 if bias is None else np.asarray(bias, np.float64)[:, None]
    target = np.maximum(np.asarray(weight, np.float64) @ x + shift, 0.0)
    error = target - np.maximum((result.low_rank + result.sparse) @ x + shift, 0.0)
    return float(np.linalg.norm(error) / max(np.linalg.norm(target), 1e-300))


def _relu_prox(target: np.ndarray, v: np.ndarray, rho: float) -> np.ndarray:
    """argmin_z ½(h − relu z)² + ρ/2 (z − v)², element-wise."""
    positive = np.maximum((target + rho * v) / (1 + rho), 0.0)
    negative = np.minimum(v, 0.0)
    cost_positive = (target - positive) ** 2 + rho * (positive - v) ** 2
    cost_negative = target**2 + rho * (negative - v) ** 2
    return np.where(cost_positive <= cost_negative, positive, negative)


def _relu_objective(target: np.ndarray, product: np.ndarray) -> float:
    return 0.5 * float(np.sum((target - np.maximum(product, 0.0)) ** 2)) / target.shape[1]
