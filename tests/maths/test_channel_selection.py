"""Channel choice by the consumer's output error after a least-squares refit."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.maths.channel_selection import LinearConsumer, elimination_order


def _refit_error(x: np.ndarray, y: np.ndarray, kept: list[int]) -> float:
    """Relative error of the least-squares refit (with intercept) of y on the kept columns."""
    z = np.hstack([x[:, kept], np.ones((len(x), 1))])
    residual = y - z @ np.linalg.lstsq(z, y, rcond=None)[0]
    return float(np.sum(residual**2) / np.sum((y - y.mean(axis=0)) ** 2))


def _consumer(x: np.ndarray, b: np.ndarray) -> LinearConsumer:
    centred = x - x.mean(axis=0)
    return LinearConsumer(centred.T @ centred, b, {c: np.array([c]) for c in range(x.shape[1])})


def _redundant_inputs(rng, channels: int, free: int, rows: int = 600) -> np.ndarray:
    """`free` independent channels; the others are exact linear combinations of them."""
    base = rng.standard_normal((rows, free)) * rng.uniform(0.5, 3.0, free)
    mix = rng.standard_normal((free, channels - free))
    return np.hstack([base, base @ mix])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_drops_channels_that_are_combinations_of_the_kept_ones(seed):
    rng = np.random.default_rng(seed)
    x = _redundant_inputs(rng, channels=12, free=5)
    b = rng.standard_normal((12, 4))
    order, damage = elimination_order([_consumer(x, b)], 12, ridge=1e-12)
    kept = sorted(set(range(12)) - set(order[:7].tolist()))
    assert damage[7] < 1e-8
    assert _refit_error(x, x @ b, kept) < 1e-10  # five independent channels carry everything
    assert damage[8] > 1e-3  # one more and information is lost


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_selection_error_is_at_most_a_magnitude_choice(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((800, 16)) @ rng.standard_normal((16, 16))  # correlated channels
    b = rng.standard_normal((16, 6))
    y = x @ b
    order, _ = elimination_order([_consumer(x, b)], 16, ridge=1e-12)
    norms = np.linalg.norm(b, axis=1)
    for removed in (4, 8, 12):
        chosen = sorted(set(range(16)) - set(order[:removed].tolist()))
        by_norm = sorted(np.argsort(-norms)[: 16 - removed].tolist())
        assert _refit_error(x, y, chosen) <= _refit_error(x, y, by_norm) + 1e-12
