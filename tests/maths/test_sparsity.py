"""Pruning maths: magnitude masks, N:M masks, uniform quantisation of survivors."""

import numpy as np
import pytest

from onnxcompress.maths.sparsity import magnitude_masks, nm_mask, quantize_uniform


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "small_scale": rng.normal(0, 0.01, (16, 8, 3, 3)).astype(np.float32),
        "large_scale": rng.normal(0, 1.0, (64, 32)).astype(np.float32),
        "vector": rng.normal(0, 0.5, (50,)).astype(np.float32),
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.97, 1.0])
def test_layer_scope_prunes_exactly_per_tensor(sparsity):
    weights = _weights()
    masks = magnitude_masks(weights, sparsity, "layer")
    for name, w in weights.items():
        assert masks[name].shape == w.shape and masks[name].dtype == bool
        assert (~masks[name]).sum() == round(sparsity * w.size)
        if masks[name].any() and (~masks[name]).any():  # pruned are the smallest
            assert np.abs(w[~masks[name]]).max() <= np.abs(w[masks[name]]).min()


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_global_scope_prunes_exactly_overall(sparsity):
    weights = _weights()
    masks = magnitude_masks(weights, sparsity, "global")
    total = sum(w.size for w in weights.values())
    assert sum((~m).sum() for m in masks.values()) == round(sparsity * total)


def test_global_scope_normalises_by_rms():
    weights = _weights()
    masks = magnitude_masks(weights, 0.5, "global")
    # Raw magnitudes would prune the 0.01-scale tensor entirely; RMS-normalised scores do not.
    kept = masks["small_scale"].mean()
    assert 0.3 < kept < 0.7
    # Scaling one tensor does not change any mask.
    scaled = dict(weights, large_scale=weights["large_scale"] * 1000)
    again = magnitude_masks(scaled, 0.5, "global")
    for name in weights:
        np.testing.assert_array_equal(masks[name], again[name])


def test_global_ranks_by_normalised_magnitude():
    weights = _weights(3)
    masks = magnitude_masks(weights, 0.6, "global")
    scores = {
        n: np.abs(w) / np.sqrt(np.mean(w.astype(np.float64) ** 2)) for n, w in weights.items()
    }
    pruned = np.concatenate([scores[n][~masks[n]] for n in weights])
    kept = np.concatenate([scores[n][masks[n]] for n in weights])
    assert pruned.max() <= kept.min()


def test_ties_and_zero_tensors_are_deterministic():
    weights = {"zeros": np.zeros((10, 10)), "ones": np.ones((4, 5))}
    first = magnitude_masks(weights, 0.5, "global")
    second = magnitude_masks(weights, 0.5, "global")
    for name in weights:
        np.testing.assert_array_equal(first[name], second[name])
    assert sum((~m).sum() for m in first.values()) == 60
    assert magnitude_masks({}, 0.5, "global") == {}


def test_bad_arguments():
    with pytest.raises(ValueError):
        magnitude_masks(_weights(), 1.5, "global")
    with pytest.raises(ValueError):
        magnitude_masks(_weights(), 0.5, "network")


@pytest.mark.parametrize(("n", "m", "axis"), [(2, 4, 1), (1, 4, 1), (2, 4, 0), (4, 8, -1)])
def test_nm_mask_keeps_n_largest_of_each_group(n, m, axis):
    weight = np.random.default_rng(1).normal(size=(8, 16, 3, 8))
    keep = nm_mask(weight, n, m, axis)
    assert keep.shape == weight.shape
    moved_keep = np.moveaxis(keep, axis, -1)
    moved_w = np.abs(np.moveaxis(weight, axis, -1))
    groups_keep = moved_keep.reshape(-1, m)
    groups_w = moved_w.reshape(-1, m)
    assert (groups_keep.sum(axis=1) == n).all()
    for kept, values in zip(groups_keep, groups_w, strict=True):
        if n < m:
            assert values[kept].min() >= values[~kept].max()


def test_nm_mask_ties_and_errors():
    keep = nm_mask(np.ones((2, 4)), 2, 4, axis=1)
    assert keep.tolist() == [[True, True, False, False]] * 2
    with pytest.raises(ValueError):
        nm_mask(np.ones((2, 6)), 2, 4, axis=1)
    with pytest.raises(ValueError):
        nm_mask(np.ones((2, 4)), 5, 4, axis=1)


@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
def test_quantize_uniform(bits):
    values = np.random.default_rng(2).laplace(0, 0.1, 5000)
    values = values[values != 0]
    codes, codebook = quantize_uniform(values, bits)
    assert codebook.dtype == np.float32 and codebook.size == 2**bits
    assert codes.shape == values.shape and codes.min() >= 0 and codes.max() < 2**bits
    recon = codebook[codes]
    np.testing.assert_allclose(codebook, -codebook[::-1])  # symmetric
    assert not np.any(recon == 0)  # a survivor never becomes a pruned weight
    assert np.all(np.sign(recon) == np.sign(values))
    step = np.abs(values).max() / 2 ** (bits - 1)
    assert np.abs(recon - values).max() <= step / 2 + 1e-6


def test_quantize_error_falls_with_bits():
    values = np.random.default_rng(4).normal(size=2000)
    errors = []
    for bits in (2, 4, 6, 8):
        codes, codebook = quantize_uniform(values, bits)
        errors.append(np.sqrt(np.mean((codebook[codes] - values) ** 2)))
    assert errors == sorted(errors, reverse=True)


def test_quantize_empty_and_bad_bits():
    codes, codebook = quantize_uniform(np.zeros(0), 4)
    assert codes.size == 0 and codebook.size == 16
    with pytest.raises(ValueError):
        quantize_uniform(np.ones(3), 0)
