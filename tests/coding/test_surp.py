"""SuRP maths and stream: bit-exact round trip, the stop rules, the SuRP step rule, coding."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcompress.coding import surp as surp
from onnxcompress.coding.entropy import CodingError, encode_gaps
from onnxcompress.coding.surp_stream import VERSION, SurpStream, encode_payload, parse_payload
from onnxcompress.maths.successive_pruning import NORMALIZATIONS, pool_weights, threshold_constants


def laplacian(seed: int, *shapes: tuple[int, ...], scale: float = 0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"w{i}": rng.laplace(0, scale, shape).astype(np.float32) for i, shape in enumerate(shapes)
    }


def bits_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def rel_error(weights: dict, approx: dict) -> float:
    diff = sum(float(np.sum((weights[k].astype(float) - approx[k]) ** 2)) for k in weights)
    return math.sqrt(diff / sum(float(np.sum(weights[k].astype(float) ** 2)) for k in weights))


shape = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(shape, min_size=1, max_size=3),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    normalize=st.sampled_from(NORMALIZATIONS),
)
def test_decode_of_payload_equals_encoder_reconstruction_bit_for_bit(
    shapes, sparsity, seed, normalize
):
    weights = laplacian(seed, *shapes)
    result = surp.surp_encode(weights, sparsity=sparsity, normalize=normalize)
    decoded = surp.decode_payload(encode_payload(result.stream))
    assert bits_equal(decoded, result.weights)
    assert all(
        decoded[k].dtype == np.float32 and decoded[k].shape == weights[k].shape for k in weights
    )
    size = sum(w.size for w in weights.values())
    # The stop rule: exactly round((1 - sparsity) n) nonzeros, one more step would add one.
    assert result.nonzeros == min(round((1 - sparsity) * size), size)
    # Survivors keep their sign; pruned weights are exactly zero.
    for k in weights:
        kept = decoded[k] != 0
        assert np.all(np.sign(decoded[k][kept]) == np.sign(weights[k][kept]))


@pytest.mark.parametrize("sparsity", [0.95, 0.8, 0.5])
def test_sparsity_reached_within_one_step(sparsity):
    weights = laplacian(1, (64, 32, 3, 3), (10, 64))
    result = surp.surp_encode(weights, sparsity=sparsity)
    size = sum(w.size for w in weights.values())
    assert abs((1 - result.nonzeros / size) - sparsity) <= 1 / size
    # One step adds at most one nonzero: the last step is the one that reached the target.
    assert result.steps >= result.nonzeros


def replayed_picks(stream: SurpStream):
    """(indices, τ per step) recomputed independently of surp.replay_magnitudes."""
    indices, taus = [], []
    lam, prev = stream.initial_lambda, -1
    refreshes = dict(
        zip(stream.refresh_steps.tolist(), stream.refresh_lambdas.tolist(), strict=True)
    )
    for k, gap in enumerate(stream.gaps.tolist()):
        lam = refreshes.get(k, lam)
        prev = (prev + gap + 1) % stream.size
        indices.append(prev)
        taus.append(stream.c / lam)
        lam *= stream.growth
    return indices, taus


def test_every_step_picks_a_residual_above_the_threshold():
    weights = laplacian(2, (40, 50), (7, 9, 3))
    result = surp.surp_encode(weights, sparsity=0.6)
    magnitudes, _, _ = pool_weights(weights)
    residual = magnitudes.copy()
    indices, taus = replayed_picks(result.stream)
    assert result.refreshes > 0
    for index, tau in zip(indices, taus, strict=True):
        assert residual[index] > tau  # the SuRP rule: only weights above τ are sent
        residual[index] -= tau
    # The decoder's reconstruction is what the encoder took off the residuals.
    np.testing.assert_allclose(surp.replay_magnitudes(result.stream) + residual, magnitudes)
    n = magnitudes.size
    c, growth = threshold_constants(n)
    assert result.stream.c == c == pytest.approx(math.log(n / math.log(n)))
    assert result.stream.growth == growth == pytest.approx(n / (n - c))


def test_error_falls_as_sparsity_falls():
    weights = laplacian(3, (100, 80), (30, 30))
    errors = [
        rel_error(weights, surp.surp_encode(weights, sparsity=s).weights)
        for s in (0.95, 0.8, 0.5, 0.2)
    ]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.2 < errors[0]


def test_refresh_events_round_trip():
    weights = laplacian(4, (5000,))
    result = surp.surp_encode(weights, sparsity=0.7)
    parsed = parse_payload(encode_payload(result.stream))
    assert result.refreshes > 5
    np.testing.assert_array_equal(parsed.refresh_steps, result.stream.refresh_steps)
    assert parsed.refresh_lambdas.tobytes() == result.stream.refresh_lambdas.tobytes()
    np.testing.assert_array_equal(parsed.gaps, result.stream.gaps)
    np.testing.assert_array_equal(parsed.signs, result.stream.signs)
    assert (parsed.c, parsed.growth, parsed.initial_lambda) == (
        result.stream.c,
        result.stream.growth,
        result.stream.initial_lambda,
    )


def test_all_zero_and_tiny_tensors():
    weights = {
        "zeros": np.zeros((3, 4), np.float32),
        "one": np.array([0.7], np.float32),
        "pair": np.array([-0.2, 0.1], np.float32),
    }
    for sparsity in (0.0, 0.5, 1.0):
        result = surp.surp_encode(weights, sparsity=sparsity)
        decoded = surp.decode_payload(encode_payload(result.stream))
        assert bits_equal(decoded, result.weights)
        assert not decoded["zeros"].any()
    # Only 3 weights are nonzero: sparsity 0 stops when all of them are picked.
    assert surp.surp_encode(weights, sparsity=0.0).nonzeros == 3
    empty = surp.surp_encode({}, sparsity=0.5)
    assert surp.decode_payload(encode_payload(empty.stream)) == {}
    only_zeros = surp.surp_encode({"z": np.zeros(5, np.float32)}, sparsity=0.0)
    assert only_zeros.steps == 0


def test_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        surp.surp_encode({"w": np.array([1.0, np.nan], np.float32)})


def test_rms_normalisation_prunes_tensors_of_different_sizes_alike():
    rng = np.random.default_rng(5)
    weights = {
        "small": rng.laplace(0, 1.0, 200).astype(np.float32),
        "large": rng.laplace(0, 0.05, 20000).astype(np.float32),
    }

    def kept(normalize):
        decoded = surp.surp_encode(weights, sparsity=0.9, normalize=normalize).weights
        return {k: np.count_nonzero(v) / v.size for k, v in decoded.items()}

    rms = kept("rms")
    assert abs(rms["small"] - rms["large"]) < 0.05
    l2 = kept("l2")  # unit energy per tensor: the large tensor's weights all look tiny
    assert l2["small"] > 0.5 > 0.1 > l2["large"]


def test_bits_per_step_close_to_theory_on_laplacian_data():
    n = 50000
    result = surp.surp_encode(laplacian(6, (n,)), sparsity=0.95)
    bits = 8 * len(encode_gaps(result.stream.gaps)) / result.steps
    theory = math.log2(n / math.log(n)) + 1.44
    assert abs(bits - theory) < 1.0


def test_target_bits_stops_within_the_budget():
    weights = laplacian(7, (120, 100))
    size = 12000
    for bits_per_param in (0.3, 1.0, 2.5):
        budget = int(bits_per_param * size)
        result = surp.surp_encode(weights, sparsity=None, target_bits=budget)
        coded = 8 * len(encode_payload(result.stream))
        assert 0.9 * budget <= coded <= budget
    tiny = surp.surp_encode(weights, sparsity=None, target_bits=8)
    assert tiny.steps == 0


def test_larger_beta_gives_cheaper_steps():
    weights = laplacian(8, (20000,))

    def gap_bits(beta):
        stream = surp.surp_encode(weights, sparsity=0.9, beta=beta).stream
        return 8 * len(encode_gaps(stream.gaps)) / stream.steps

    assert gap_bits(1000) < gap_bits(None) - 2


@pytest.fixture(scope="module")
def payload() -> bytes:
    return encode_payload(surp.surp_encode(laplacian(9, (30, 40)), sparsity=0.7).stream)


def test_truncated_payload_is_refused(payload):
    for length in (0, 3, 5, len(payload) // 2, len(payload) - 1):
        with pytest.raises(CodingError):
            surp.decode_payload(payload[:length])


def test_corrupted_payload_is_refused(payload):
    for position in (6, 20, len(payload) // 2, len(payload) - 1):
        broken = bytearray(payload)
        broken[position] ^= 0x10
        with pytest.raises(CodingError):
            surp.decode_payload(bytes(broken))


def test_wrong_version_is_refused(payload):
    with pytest.raises(CodingError, match="version"):
        surp.decode_payload(bytes([VERSION + 1]) + payload[1:])
