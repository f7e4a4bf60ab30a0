"""Entropy coder: exact round trips (hypothesis), sizes near the entropy, clean errors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcompress.coding import entropy as entropy
from onnxcompress.coding.entropy import CodingError

SIZES = st.integers(min_value=0, max_value=5000)


@st.composite
def symbol_arrays(draw):
    alphabet = draw(st.sampled_from([1, 2, 3, 16, 255, 4096, 1 << 20]))
    size = draw(SIZES)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Skewed or uniform: a random power makes some symbols much more frequent.
    skew = draw(st.sampled_from([1.0, 3.0, 8.0]))
    symbols = np.floor(alphabet * rng.random(size) ** skew).astype(np.int64)
    return np.minimum(symbols, alphabet - 1), alphabet


@given(symbol_arrays())
@settings(max_examples=60, deadline=None)
def test_categorical_round_trip(case):
    symbols, alphabet = case
    data = entropy.encode_categorical(symbols, alphabet)
    decoded = entropy.decode_categorical(data, symbols.size, alphabet)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, symbols)


@given(hnp.arrays(np.int64, SIZES, elements=st.integers(0, 3)))
@settings(max_examples=30, deadline=None)
def test_categorical_round_trip_small_alphabet(symbols):
    data = entropy.encode_categorical(symbols, 4)
    np.testing.assert_array_equal(entropy.decode_categorical(data, symbols.size, 4), symbols)


@st.composite
def gap_arrays(draw):
    size = draw(SIZES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mean = draw(st.sampled_from([0.1, 1.0, 30.0, 1e4, 1e9]))
    gaps = rng.geometric(1.0 / (mean + 1.0), size).astype(np.int64) - 1
    # Sprinkle huge values (up to 2**40 and the 2**62 - 1 limit) among the geometric ones.
    huge = draw(st.lists(st.integers(0, 2**62 - 1), max_size=5))
    where = draw(st.lists(st.integers(0, max(size - 1, 0)), min_size=len(huge), max_size=len(huge)))
    if size:
        gaps[where] = huge
    return gaps


@given(gap_arrays())
@settings(max_examples=60, deadline=None)
def test_gaps_round_trip(gaps):
    decoded = entropy.decode_gaps(entropy.encode_gaps(gaps), gaps.size)
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, gaps)


@given(hnp.arrays(np.int64, st.integers(0, 300), elements=st.integers(0, 2**40)))
@settings(max_examples=40, deadline=None)
def test_gaps_round_trip_any_values(gaps):
    np.testing.assert_array_equal(entropy.decode_gaps(entropy.encode_gaps(gaps), gaps.size), gaps)


@given(SIZES, st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
@settings(max_examples=40, deadline=None)
def test_bits_round_trip(size, p_one, seed):
    bits = (np.random.default_rng(seed).random(size) < p_one).astype(np.uint8)
    decoded = entropy.decode_bits(entropy.encode_bits(bits), size)
    np.testing.assert_array_equal(decoded, bits)


@given(st.lists(st.binary(max_size=300), max_size=20))
@settings(max_examples=60, deadline=None)
def test_sections_round_trip(parts):
    assert entropy.unpack_sections(entropy.pack_sections(parts)) == parts


def test_empty_inputs():
    empty = np.zeros(0, dtype=np.int64)
    assert entropy.decode_categorical(entropy.encode_categorical(empty, 5), 0, 5).size == 0
    assert entropy.decode_gaps(entropy.encode_gaps(empty), 0).size == 0
    assert entropy.decode_bits(entropy.encode_bits(empty), 0).size == 0
    assert entropy.unpack_sections(entropy.pack_sections([])) == []


def test_single_symbol_costs_only_the_header():
    symbols = np.full(100_000, 3)
    data = entropy.encode_categorical(symbols, 1 << 20)
    assert len(data) < 12
    np.testing.assert_array_equal(entropy.decode_categorical(data, symbols.size, 1 << 20), symbols)
    ones = entropy.encode_categorical(np.zeros(50, dtype=np.int64), 1)
    assert entropy.decode_categorical(ones, 50, 1).tolist() == [0] * 50


def test_many_distinct_symbols_fall_back_to_raw_fields():
    rng = np.random.default_rng(1)
    symbols = rng.permutation(1 << 17)  # more distinct symbols than a static model handles
    data = entropy.encode_categorical(symbols, 1 << 17)
    assert len(data) == 1 + (1 << 17) * 17 // 8
    np.testing.assert_array_equal(entropy.decode_categorical(data, symbols.size, 1 << 17), symbols)


def _geometric_entropy_bits(p: float) -> float:
    q = 1.0 - p
    return (-q * np.log2(q) - p * np.log2(p)) / p


@pytest.mark.parametrize("mean", [0.3, 3.0, 40.0, 2000.0, 1e6])
def test_gap_cost_near_entropy(mean):
    count = 20_000
    p = 1.0 / (mean + 1.0)
    gaps = np.random.default_rng(7).geometric(p, count) - 1
    bits = 8 * len(entropy.encode_gaps(gaps))
    ideal = count * _geometric_entropy_bits(p)
    assert bits <= 1.03 * ideal + 8 * 64, (bits / count, ideal / count)


@pytest.mark.parametrize("p_one", [0.02, 0.3])
def test_bit_cost_near_entropy(p_one):
    count = 20_000
    bits = (np.random.default_rng(3).random(count) < p_one).astype(np.uint8)
    freq = bits.mean()
    ideal = count * -(freq * np.log2(freq) + (1 - freq) * np.log2(1 - freq))
    assert 8 * len(entropy.encode_bits(bits)) <= 1.01 * ideal + 8 * 16


def test_categorical_cost_near_entropy():
    rng = np.random.default_rng(5)
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    symbols = rng.choice(5, size=30_000, p=probs)
    _, counts = np.unique(symbols, return_counts=True)
    freq = counts / symbols.size
    ideal = -symbols.size * np.sum(freq * np.log2(freq))
    assert 8 * len(entropy.encode_categorical(symbols, 5)) <= 1.01 * ideal + 8 * 32


def test_deterministic():
    rng = np.random.default_rng(11)
    gaps = rng.geometric(0.01, 5000) - 1
    assert entropy.encode_gaps(gaps) == entropy.encode_gaps(gaps.copy())


def test_truncated_sections_raise_coding_error():
    data = entropy.pack_sections([b"abc", b"defgh"])
    for cut in range(len(data)):
        with pytest.raises(CodingError):
            entropy.unpack_sections(data[:cut])
    with pytest.raises(CodingError):
        entropy.unpack_sections(data + b"x")


def test_malformed_payloads_raise_coding_error():
    symbols = np.random.default_rng(2).integers(0, 9, 1000)
    data = entropy.encode_categorical(symbols, 9)
    with pytest.raises(CodingError):
        entropy.decode_categorical(data, 999, 9)  # histogram sums to 1000
    with pytest.raises(CodingError):
        entropy.decode_categorical(data[:5], 1000, 9)
    with pytest.raises(CodingError):
        entropy.decode_categorical(b"\x07" + data[1:], 1000, 9)  # unknown mode
    with pytest.raises(CodingError):
        entropy.decode_categorical(b"", 3, 9)
    gaps = entropy.encode_gaps(np.arange(100) * 1000)
    with pytest.raises(CodingError):
        entropy.decode_gaps(gaps[:-1], 100)
    assert issubclass(CodingError, ValueError)


def test_bad_encoder_input_raises_value_error():
    with pytest.raises(ValueError):
        entropy.encode_categorical(np.array([0, 5]), 5)
    with pytest.raises(ValueError):
        entropy.encode_gaps(np.array([-1]))
    with pytest.raises(ValueError):
        entropy.encode_bits(np.array([0, 2]))
    with pytest.raises(ValueError):
        entropy.encode_gaps(np.array([0.5]))
