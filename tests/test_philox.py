"""Philox4x32-10 reference: published known answers, the vectorised form against a scalar
transcription, the project's stream layout, and the exact uint32 -> float mapping."""
import numpy as np
import pytest

from gpumlp.philox import (philox4x32_10, philox4x32_10_scalar, philox_blocks, philox_fill_ref,
                           uniform01, uniform_pm1)

# Random123 kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words), expected output.
KAT = [
    ([0x00000000, 0x00000000, 0x00000000, 0x00000000], [0x00000000, 0x00000000],
     [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff],
     [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_known_answers(counter, key, expected):
    out = philox4x32_10(np.array(counter, dtype=np.uint32), np.array(key, dtype=np.uint32))
    assert [int(v) for v in out] == expected
    assert list(philox4x32_10_scalar(counter, key)) == expected


def test_vectorised_equals_scalar_loop():
    rng = np.random.default_rng(0)
    counters = rng.integers(0, 2**32, size=(3, 7, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=2, dtype=np.uint64).astype(np.uint32)
    out = philox4x32_10(counters, key)
    assert out.shape == (3, 7, 4) and out.dtype == np.uint32
    for index in np.ndindex(3, 7):
        assert tuple(int(v) for v in out[index]) == philox4x32_10_scalar(counters[index], key)


def test_blocks_follow_the_documented_layout():
    """philox_blocks / philox_fill_ref: key (seed, epoch), counter (index, block, 0, 0)."""
    seed, epoch = 12345, 7
    indices = np.array([0, 5, 59999, 3], dtype=np.int32)
    blocks = np.array([0, 1, 2, 421])
    draws = philox_blocks(seed, epoch, indices, blocks)
    for i, index in enumerate(indices):
        for j, block in enumerate(blocks):
            assert tuple(int(v) for v in draws[i, j]) == philox4x32_10_scalar((index, block, 0, 0), (seed, epoch))
    fill = philox_fill_ref(seed, epoch, indices, 3)
    assert fill.shape == (4, 12) and fill.dtype == np.uint32
    np.testing.assert_array_equal(fill.reshape(4, 3, 4), draws[:, :3])


def test_chunking_does_not_change_the_draws():
    """philox_blocks works in row chunks; a long run equals its pieces."""
    indices = np.arange(2000)
    whole = philox_blocks(1, 2, indices, np.arange(50))
    np.testing.assert_array_equal(whole[1234:1240], philox_blocks(1, 2, indices[1234:1240], np.arange(50)))


def test_distinct_epochs_images_and_seeds_give_distinct_streams():
    indices = np.arange(200)
    a = philox_fill_ref(0, 1, indices, 8)
    b = philox_fill_ref(0, 2, indices, 8)
    c = philox_fill_ref(1, 1, indices, 8)
    rows = {row.tobytes() for stream in (a, b, c) for row in stream}
    assert len(rows) == 3 * len(indices)
    # 200 x 32 words from a good generator: essentially no word repeats
    assert len(np.unique(np.concatenate([a.ravel(), b.ravel(), c.ravel()]))) > 0.999 * 3 * a.size


def test_uniform_mapping_is_exact():
    x = np.array([0, 0xff, 0x100, 0x80000000, 0xffffffff], dtype=np.uint32)
    u = uniform01(x)
    v = uniform_pm1(x)
    assert u.dtype == np.float32 and v.dtype == np.float32
    assert u.tolist() == [0.0, 0.0, 2.0 ** -24, 0.5, 1.0 - 2.0 ** -24]
    assert v.tolist() == [-1.0, -1.0, -1.0 + 2.0 ** -23, 0.0, 1.0 - 2.0 ** -23]
    # the two forms are the same value, computed exactly
    words = np.random.default_rng(1).integers(0, 2**32, size=10000, dtype=np.uint64).astype(np.uint32)
    expected = (words >> 8).astype(np.float64) * 2.0 ** -23 - 1.0
    np.testing.assert_array_equal(uniform_pm1(words).astype(np.float64), expected)
    np.testing.assert_array_equal(uniform_pm1(words), np.float32(2) * uniform01(words) - np.float32(1))


def test_draws_look_uniform():
    v = uniform_pm1(philox_fill_ref(3, 4, np.arange(500), 50)).astype(np.float64).ravel()
    assert v.min() >= -1 and v.max() < 1
    assert abs(v.mean()) < 0.01                         # sd of the mean: 0.577 / sqrt(1e5) = 0.002
    assert abs(v.var() - 1 / 3) < 0.01
    counts = np.histogram(v, bins=20, range=(-1, 1))[0]
    assert counts.min() > 0.9 * len(v) / 20 and counts.max() < 1.1 * len(v) / 20
