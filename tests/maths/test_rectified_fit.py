"""The refit judged after a residual Add and a Relu: exact with the offset, and the rectified
loss falls step by step below the plain least-squares fit's."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.maths.rectified_fit import downstream_error, downstream_fit


def _rectified_case(rng, rows=3000, k=10, n=4):
    z = rng.standard_normal((rows, k))
    offset = rng.standard_normal((rows, n))
    targets = z @ rng.standard_normal((k, n)) + 0.3 + offset
    targets = targets + 0.5 * rng.standard_normal(targets.shape) * (targets < 0)  # noise below 0
    return z, targets, offset


def test_downstream_fit_uses_the_offset_and_is_exact_when_it_can_be():
    rng = np.random.default_rng(4)
    z, offset = rng.standard_normal((500, 6)), rng.standard_normal((500, 3))
    p, b = rng.standard_normal((3, 6)), rng.standard_normal(3)
    targets = z @ p.T + b + offset
    found_p, found_b = downstream_fit(z, targets, offset, rectified=False, ridge=0.0)
    np.testing.assert_allclose(found_p, p, atol=1e-9)
    np.testing.assert_allclose(found_b, b, atol=1e-9)
    assert downstream_error(z, targets, offset, found_p, found_b, rectified=True) < 1e-15


@pytest.mark.parametrize("seed", [5, 6])
def test_rectified_fit_beats_the_plain_fit_on_the_rectified_loss_and_never_rises(seed):
    rng = np.random.default_rng(seed)
    z, targets, offset = _rectified_case(rng)
    plain = downstream_fit(z, targets, offset, rectified=False)
    losses = [
        downstream_error(
            z, targets, offset, *downstream_fit(z, targets, offset, True, steps=s), True
        )
        for s in range(0, 6)
    ]
    assert losses[0] == pytest.approx(downstream_error(z, targets, offset, *plain, True))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < 0.95 * losses[0]
