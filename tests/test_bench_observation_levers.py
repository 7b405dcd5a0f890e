"""benchmarks/bench_observation_levers.py and benchmarks/bench_latent_shift.py: the parts with known answers."""
import numpy as np
import pytest

from benchmarks import bench_latent_shift as shift
from benchmarks import bench_observation_levers as observation


def test_library_variants_stay_within_each_label():
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 30 + ["b"] * 20)
    latents = rng.normal(size=(50, 4)).astype(np.float32)
    library = np.arange(50, dtype=np.float32) + 1000
    variants = observation.library_variants(latents, labels, library, seed=3)
    assert np.array_equal(variants["own_library"], library)
    for name in ("shuffled_library", "neighbour_library"):
        for label in ("a", "b"):
            rows = labels == label
            assert set(variants[name][rows]) <= set(library[rows]), name  # drawn from the cell's own label
    for label in ("a", "b"):  # the shuffle is a permutation of the label's library sizes
        rows = labels == label
        assert sorted(variants["shuffled_library"][rows]) == sorted(library[rows])
    assert not np.array_equal(variants["shuffled_library"], library)
    assert (variants["neighbour_library"] != library).all()  # a neighbour, never the cell itself


def test_the_neighbour_library_comes_from_a_close_latent():
    labels = np.array(["a"] * 12)
    latents = np.repeat(np.arange(6, dtype=np.float32), 2)[:, None] * 10.0  # pairs of identical latents
    library = np.arange(12, dtype=np.float32)
    observation.NEIGHBOURS, saved = 1, observation.NEIGHBOURS
    try:
        variants = observation.library_variants(latents, labels, library, seed=0)
    finally:
        observation.NEIGHBOURS = saved
    assert np.array_equal(variants["neighbour_library"], library.reshape(6, 2)[:, ::-1].reshape(-1))


def test_the_donor_offset_is_the_weighted_mean_difference_over_the_other_types():
    means = {("alpha", "d1"): (np.array([1.0, 0.0]), 10), ("alpha", "d2"): (np.array([3.0, 0.0]), 20),
             ("gamma", "d1"): (np.array([0.0, 1.0]), 30), ("gamma", "d2"): (np.array([0.0, 2.0]), 30),
             ("beta", "d1"): (np.array([5.0, 5.0]), 40), ("delta", "d2"): (np.array([9.0, 9.0]), 40),
             ("tiny", "d1"): (np.array([0.0, 0.0]), 2), ("tiny", "d2"): (np.array([100.0, 100.0]), 2)}
    offset = shift.donor_offset(means, "beta", source="d1", target="d2")
    # alpha (weight 10): (2, 0); gamma (weight 30): (0, 1); beta is the type itself, delta has no d1 cells and
    # tiny too few cells
    np.testing.assert_allclose(offset, (np.array([2.0, 0.0]) * 10 + np.array([0.0, 1.0]) * 30) / 40)
    with pytest.raises(SystemExit, match="share no other type"):
        shift.donor_offset({("beta", "d1"): (np.zeros(2), 9)}, "beta", "d1", "d2")
